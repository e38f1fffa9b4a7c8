"""Approval requests in the database: consume, create-or-reuse, decide, withdraw, expire.

The gate, the approvals API and the dashboard all go through these functions, so one set of
rules holds everywhere. None of them commits: the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, false, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from . import events
from .auth import Caller, deciding_levels
from .errors import ApiError
from .extensions import db
from .models import (
    ApprovalEvent,
    ApprovalRequest,
    ApprovalScope,
    ApprovalStatus,
    Membership,
    Workspace,
    utcnow,
)
from .policy import ActionPolicy, policy_for

PENDING = ApprovalStatus.PENDING.value
APPROVED = ApprovalStatus.APPROVED.value
DENIED = ApprovalStatus.DENIED.value
EXPIRED = ApprovalStatus.EXPIRED.value
CONSUMED = ApprovalStatus.CONSUMED.value
WITHDRAWN = ApprovalStatus.WITHDRAWN.value


@dataclass(frozen=True)
class GateKey:
    """What an approval is bound to."""

    workspace_id: int
    action: str
    request_hash: str

    def matches(self):
        return and_(
            ApprovalRequest.workspace_id == self.workspace_id,
            ApprovalRequest.action == self.action,
            ApprovalRequest.request_hash == self.request_hash,
        )


def record_event(
    approval_id: int, kind: str, actor: str, detail: dict[str, Any] | None = None
) -> ApprovalEvent:
    """Append to the event log and queue the live notification for after commit."""
    entry = ApprovalEvent(approval_id=approval_id, kind=kind, actor=actor, detail=detail or {})
    db.session.add(entry)
    db.session.flush()
    events.queue_change(db.session(), events.ApprovalChange(approval_id, entry.id, kind))
    return entry


# ---- the gate's statements ---------------------------------------------------------------------


def consume(key: GateKey, caller: Caller, now: datetime) -> int | None:
    """Atomically mark one usable approval for ``key`` consumed; return its id, or None.

    One statement. On PostgreSQL the candidate row is locked with FOR UPDATE SKIP LOCKED, so
    concurrent retries never wait on, nor both take, the same approval. The caller's
    transaction must also carry the operation: a rollback leaves the approval usable.
    """
    candidate = (
        select(ApprovalRequest.id)
        .where(
            key.matches(),
            ApprovalRequest.status == APPROVED,
            ApprovalRequest.approval_expires_at > now,
        )
        .order_by(ApprovalRequest.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    approval_id = db.session.execute(
        update(ApprovalRequest)
        .where(ApprovalRequest.id == candidate, ApprovalRequest.status == APPROVED)
        .values(status=CONSUMED, consumed_at=now)
        .returning(ApprovalRequest.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if approval_id is not None:
        record_event(approval_id, "consumed", caller.label)
    return approval_id


def find_pending(key: GateKey) -> ApprovalRequest | None:
    return db.session.execute(
        select(ApprovalRequest).where(key.matches(), ApprovalRequest.status == PENDING)
    ).scalar_one_or_none()


def hash_for_idempotency_key(caller: Caller, key: str) -> str | None:
    """The request hash this caller last sent under an Idempotency-Key, if any."""
    return db.session.execute(
        select(ApprovalRequest.request_hash)
        .where(
            ApprovalRequest.requested_by_token_id == caller.token_id,
            ApprovalRequest.idempotency_key == key,
        )
        .order_by(ApprovalRequest.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def find_recent_denial(key: GateKey, policy: ActionPolicy, now: datetime) -> ApprovalRequest | None:
    """A denial stays the answer for the pending TTL, so the agent stops asking."""
    return db.session.execute(
        select(ApprovalRequest)
        .where(
            key.matches(),
            ApprovalRequest.status == DENIED,
            ApprovalRequest.decided_at > now - policy.pending_ttl,
        )
        .order_by(ApprovalRequest.decided_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def expire_if_due(request: ApprovalRequest, now: datetime) -> bool:
    """Mark a pending request past its deadline expired (conditionally, so only once)."""
    if request.status != PENDING or request.expires_at > now:
        return False
    done = db.session.execute(
        update(ApprovalRequest)
        .where(ApprovalRequest.id == request.id, ApprovalRequest.status == PENDING)
        .values(status=EXPIRED)
        .returning(ApprovalRequest.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if done is not None:
        record_event(request.id, "expired", "system")
        db.session.refresh(request)
    return done is not None


@dataclass(frozen=True)
class NewRequest:
    key: GateKey
    policy: ActionPolicy
    summary: str
    context: dict[str, Any]
    chain: list[Workspace]  # nearest first
    idempotency_key: str | None = None


def create_or_reuse_pending(
    new: NewRequest, caller: Caller, now: datetime
) -> tuple[ApprovalRequest, bool]:
    """The single pending row for the key: inserted if absent, else the existing one.

    A conditional insert backed by the partial unique index on pending rows: concurrent
    first calls race on the index, one inserts, the others read the winner's row.
    """
    values = {
        "workspace_id": new.key.workspace_id,
        "action": new.key.action,
        "request_hash": new.key.request_hash,
        "summary": new.summary,
        "context": new.context,
        "workspace_path": [{"id": ws.id, "name": ws.name} for ws in reversed(new.chain)],
        "requested_by_token_id": caller.token_id,
        "requested_by_kind": caller.kind,
        "requested_by_name": caller.name,
        "status": PENDING,
        "created_at": now,
        "expires_at": now + new.policy.pending_ttl,
        "idempotency_key": new.idempotency_key,
    }
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(ApprovalRequest)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=["workspace_id", "action", "request_hash"],
            index_where=ApprovalRequest.status == PENDING,
        )
        .returning(ApprovalRequest.id)
    )
    new_id = db.session.execute(statement).scalar_one_or_none()
    if new_id is None:
        existing = find_pending(new.key)
        if existing is None:  # the winner's row vanished (withdrawn/decided) in between
            raise ApiError(409, "conflict", "a concurrent request changed this approval; retry")
        return existing, False
    db.session.add_all(
        ApprovalScope(approval_id=new_id, workspace_id=ws.id, level=level)
        for level, ws in enumerate(new.chain)
    )
    record_event(new_id, "created", caller.label, {"summary": new.summary})
    return db.session.get_one(ApprovalRequest, new_id), True


# ---- humans deciding ---------------------------------------------------------------------------


def scope_levels(approval_id: int) -> dict[int, int]:
    rows = db.session.execute(
        select(ApprovalScope.workspace_id, ApprovalScope.level).where(
            ApprovalScope.approval_id == approval_id
        )
    )
    return {workspace_id: level for workspace_id, level in rows}


def get_for_update(approval_id: int) -> ApprovalRequest:
    request = db.session.execute(
        select(ApprovalRequest).where(ApprovalRequest.id == approval_id).with_for_update()
    ).scalar_one_or_none()
    if request is None:
        raise ApiError(404, "not_found", f"approval {approval_id} not found")
    return request


def decide(approval_id: int, caller: Caller, decision: str, reason: str | None) -> ApprovalRequest:
    """Approve or deny a pending request: humans with owner/approver rights on it or above."""
    if not caller.is_human:
        raise ApiError(403, "forbidden", "only a human may decide an approval")
    now = utcnow()
    request = get_for_update(approval_id)
    levels = deciding_levels(caller.user_id, scope_levels(approval_id))
    if not levels:
        raise ApiError(403, "forbidden", "you have no approval rights on this workspace")
    expire_if_due(request, now)
    if request.status != PENDING:
        raise ApiError(
            409, "not_pending", f"approval {approval_id} is {request.status}", status=request.status
        )
    request.decided_at = now
    request.decided_by_user_id = caller.user_id
    request.decided_by_name = caller.name
    request.decided_level = levels[0]
    request.reason = reason
    if decision == "approve":
        request.status = APPROVED
        request.approval_expires_at = now + policy_for(request.action).approval_ttl
    else:
        request.status = DENIED
    db.session.flush()
    record_event(
        approval_id,
        "approved" if decision == "approve" else "denied",
        caller.label,
        {"reason": reason, "level": levels[0]},
    )
    return request


def withdraw(approval_id: int, caller: Caller) -> ApprovalRequest:
    """The requesting token takes back its own pending request."""
    request = get_for_update(approval_id)
    if caller.token_id is None or request.requested_by_token_id != caller.token_id:
        raise ApiError(403, "forbidden", "only the caller that asked may withdraw a request")
    expire_if_due(request, utcnow())
    if request.status != PENDING:
        raise ApiError(
            409, "not_pending", f"approval {approval_id} is {request.status}", status=request.status
        )
    request.status = WITHDRAWN
    db.session.flush()
    record_event(approval_id, "withdrawn", caller.label)
    return request


def expire_due(now: datetime | None = None, limit: int = 500) -> int:
    """Expire pending requests past their deadline, one event each. Safe with several workers."""
    now = now or utcnow()
    due = (
        select(ApprovalRequest.id)
        .where(ApprovalRequest.status == PENDING, ApprovalRequest.expires_at <= now)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(
        db.session.execute(
            update(ApprovalRequest)
            .where(ApprovalRequest.id.in_(due.scalar_subquery()), ApprovalRequest.status == PENDING)
            .values(status=EXPIRED)
            .returning(ApprovalRequest.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    for approval_id in ids:
        record_event(approval_id, "expired", "system")
    return len(ids)


# ---- reading -----------------------------------------------------------------------------------


def effective_status(request: ApprovalRequest, now: datetime | None = None) -> str:
    """Pending past its deadline, or approved past its usable window, reads as expired."""
    now = now or utcnow()
    if request.status == PENDING and request.expires_at <= now:
        return EXPIRED
    if (
        request.status == APPROVED
        and request.approval_expires_at
        and request.approval_expires_at <= now
    ):
        return EXPIRED
    return request.status


def status_filter(status: str, now: datetime):
    """SQL for "effective status is ``status``", matching effective_status()."""
    R = ApprovalRequest
    if status == PENDING:
        return and_(R.status == PENDING, R.expires_at > now)
    if status == APPROVED:
        return and_(R.status == APPROVED, R.approval_expires_at > now)
    if status == EXPIRED:
        return or_(
            R.status == EXPIRED,
            and_(R.status == PENDING, R.expires_at <= now),
            and_(R.status == APPROVED, R.approval_expires_at <= now),
        )
    if status in {s.value for s in ApprovalStatus}:
        return R.status == status
    return false()


def visible_to(caller: Caller, scope_workspace_ids: list[int] | None = None):
    """SQL condition: requests the caller may see.

    Humans see requests in workspaces where they hold any role, or below; tokens see the
    requests inside their scope (every request when unscoped).
    """
    R = ApprovalRequest
    if caller.is_human:
        member_of = select(Membership.workspace_id).where(Membership.user_id == caller.user_id)
        return R.id.in_(
            select(ApprovalScope.approval_id).where(ApprovalScope.workspace_id.in_(member_of))
        )
    if caller.scope_workspace_id is None:
        return R.id.is_not(None)
    return R.id.in_(
        select(ApprovalScope.approval_id).where(
            ApprovalScope.workspace_id == caller.scope_workspace_id
        )
    )


def events_of(approval_id: int) -> list[ApprovalEvent]:
    return list(
        db.session.execute(
            select(ApprovalEvent)
            .where(ApprovalEvent.approval_id == approval_id)
            .order_by(ApprovalEvent.id)
        ).scalars()
    )


def to_json(request: ApprovalRequest, now: datetime | None = None) -> dict[str, Any]:
    from flask import url_for

    return {
        "id": request.id,
        "status": effective_status(request, now),
        "action": request.action,
        "workspace_id": request.workspace_id,
        "workspace_path": request.workspace_path,
        "summary": request.summary,
        "context": request.context,
        "request_hash": request.request_hash,
        "requested_by": {
            "token_id": request.requested_by_token_id,
            "kind": request.requested_by_kind,
            "name": request.requested_by_name,
        },
        "created_at": request.created_at.isoformat(),
        "expires_at": request.expires_at.isoformat(),
        "decided_at": request.decided_at.isoformat() if request.decided_at else None,
        "decided_by": request.decided_by_name,
        "decided_level": request.decided_level,
        "reason": request.reason,
        "approval_expires_at": request.approval_expires_at.isoformat()
        if request.approval_expires_at
        else None,
        "consumed_at": request.consumed_at.isoformat() if request.consumed_at else None,
        "status_url": url_for("api.get_approval", approval_id=request.id),
    }
