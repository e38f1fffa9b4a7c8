"""Typed SQLAlchemy 2.0 models. Every index and constraint is named (see extensions.py)."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import db


def utcnow() -> datetime:
    """The one clock of the app: timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on both engines (SQLite drops the zone, so it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        # SQLite compares datetimes as text: store them without an offset so they sort.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Role(enum.StrEnum):
    OWNER = "owner"
    APPROVER = "approver"
    VIEWER = "viewer"


DECIDING_ROLES = (Role.OWNER.value, Role.APPROVER.value)


class TokenKind(enum.StrEnum):
    AGENT = "agent"
    USER = "user"
    SERVICE = "service"


class ApprovalStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CONSUMED = "consumed"
    WITHDRAWN = "withdrawn"


def _in(values: type[enum.StrEnum]) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Workspace(db.Model):
    __tablename__ = "workspaces"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Membership(db.Model):
    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("workspace_id", "user_id"),
        CheckConstraint(f"role IN ({_in(Role)})", name="role_known"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    user: Mapped[User] = relationship(lazy="joined")


class Secret(db.Model):
    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(db.Model):
    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(f"kind IN ({_in(TokenKind)})", name="kind_known"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    # The first characters of the plaintext, so a human can tell tokens apart; never the secret.
    prefix: Mapped[str] = mapped_column(String(24))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    workspace_id: Mapped[int | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User | None] = relationship(lazy="joined")


class ApprovalRequest(db.Model):
    """One gated request waiting for, or carrying, a human decision.

    workspace_id has no foreign key on purpose: the row must outlive the workspace a consumed
    ``workspace.delete`` removed, so the history stays complete.
    """

    __tablename__ = "approval_requests"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(ApprovalStatus)})", name="status_known"),
        # At most one pending row per key: the conditional insert (dedup) leans on it.
        Index(
            "uq_approval_requests_pending_key",
            "workspace_id",
            "action",
            "request_hash",
            unique=True,
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Serves the consume lookup; stays small because approvals are consumed or expire.
        Index(
            "ix_approval_requests_approved_key",
            "workspace_id",
            "action",
            "request_hash",
            postgresql_where=text("status = 'approved'"),
            sqlite_where=text("status = 'approved'"),
        ),
        # Serves the "was this denied recently?" lookup.
        Index(
            "ix_approval_requests_denied_key",
            "workspace_id",
            "action",
            "request_hash",
            "decided_at",
            postgresql_where=text("status = 'denied'"),
            sqlite_where=text("status = 'denied'"),
        ),
        Index("ix_approval_requests_status_created_at", "status", "created_at"),
        Index(
            "ix_approval_requests_idempotency",
            "requested_by_token_id",
            "idempotency_key",
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        # The worker's "what is due for escalation?" scan: only pending rows that can still rise.
        Index(
            "ix_approval_requests_escalate_at",
            "escalate_at",
            postgresql_where=text("status = 'pending' AND escalate_at IS NOT NULL"),
            sqlite_where=text("status = 'pending' AND escalate_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    workspace_id: Mapped[int] = mapped_column(index=True)
    action: Mapped[str] = mapped_column(String(64))
    request_hash: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Root-first list of {"id", "name"}: the workspace path when the request was made.
    workspace_path: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    requested_by_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="SET NULL")
    )
    requested_by_kind: Mapped[str] = mapped_column(String(16))
    requested_by_name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=ApprovalStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_by_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    decided_by_name: Mapped[str | None] = mapped_column(String(64))
    # 0: a member of the workspace itself decided; 1: of its parent; and so on up the tree.
    decided_level: Mapped[int | None]
    reason: Mapped[str | None] = mapped_column(Text)
    # Until when a granted approval may be consumed.
    approval_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The client's Idempotency-Key header, if it sent one: the same key may not name two requests.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # The effective policy the request was created under: its short hash, and the resolved terms
    # (N approvals, reasons, TTLs, escalation), so a later policy change never moves the goalposts.
    policy_version: Mapped[str | None] = mapped_column(String(16))
    policy_terms: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    approvals_required: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    # 0 until the worker escalates it: then the level of the ancestor whose approvers were called.
    escalation_level: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    escalate_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    votes: Mapped[list[ApprovalVote]] = relationship(
        order_by="ApprovalVote.id", lazy="select", viewonly=True
    )


class ApprovalScope(db.Model):
    """The workspaces whose approvers may decide a request: its own and every ancestor.

    Written once when the request is created, so visibility survives the workspace's deletion.
    """

    __tablename__ = "approval_scopes"
    __table_args__ = (
        Index("ix_approval_scopes_workspace_id_approval_id", "workspace_id", "approval_id"),
    )

    approval_id: Mapped[int] = mapped_column(
        ForeignKey("approval_requests.id", ondelete="CASCADE"), primary_key=True
    )
    workspace_id: Mapped[int] = mapped_column(primary_key=True)
    # Distance from the request's workspace: 0 itself, 1 its parent, ...
    level: Mapped[int]


class ApprovalEvent(db.Model):
    """Append-only log of every state change of an approval request, as a hash chain.

    Each row stores the hash of its canonical content and of the previous row's hash (audit.py),
    so editing, deleting or reordering a row breaks the chain at that row.
    """

    __tablename__ = "approval_events"
    # Two events naming the same predecessor would be a fork: the database refuses it outright.
    __table_args__ = (UniqueConstraint("prev_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    approval_id: Mapped[int] = mapped_column(
        ForeignKey("approval_requests.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(160))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class VoteDecision(enum.StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class ApprovalVote(db.Model):
    """One human's decision on a request: N distinct approvals approve it, one denial ends it."""

    __tablename__ = "approval_votes"
    __table_args__ = (
        CheckConstraint(f"decision IN ({_in(VoteDecision)})", name="decision_known"),
        # The same person never counts twice, even if two of their clicks race.
        Index(
            "uq_approval_votes_approver",
            "approval_id",
            "user_id",
            unique=True,
            postgresql_where=text("decision = 'approve'"),
            sqlite_where=text("decision = 'approve'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    approval_id: Mapped[int] = mapped_column(
        ForeignKey("approval_requests.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    username: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(8))
    # 0: a member of the request's workspace; 1: of its parent; and so on up the tree.
    level: Mapped[int]
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookFormat(enum.StrEnum):
    JSON = "json"
    SLACK = "slack"


class Webhook(db.Model):
    """A receiver of signed notifications for requests in a workspace's subtree."""

    __tablename__ = "webhooks"
    __table_args__ = (CheckConstraint(f"format IN ({_in(WebhookFormat)})", name="format_known"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    workspace_id: Mapped[int] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    format: Mapped[str] = mapped_column(String(8), default=WebhookFormat.JSON.value)
    # One bit per event kind (outbox.EVENT_BITS): the outbox insert filters with a bitwise AND.
    event_mask: Mapped[int]
    # The HMAC key: kept in clear because signing needs it; shown to the creator once.
    secret: Mapped[str] = mapped_column(String(128))
    created_by: Mapped[str] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class OutboxMessage(db.Model):
    """One event owed to one webhook; written in the transaction that made the event."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(OutboxStatus)})", name="status_known"),
        UniqueConstraint("webhook_id", "event_id"),
        # The worker's claim scan: only undelivered rows, by when they are due.
        Index(
            "ix_outbox_messages_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)  # sent as X-Countersign-Delivery
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(
        ForeignKey("approval_events.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A worker's claim: another worker takes the row over only once the lease has run out.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxAttempt(db.Model):
    """The delivery log: one row per HTTP attempt, with its status code or error."""

    __tablename__ = "outbox_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("outbox_messages.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_ms: Mapped[int]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str] = mapped_column(String(128))
