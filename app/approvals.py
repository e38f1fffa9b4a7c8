"""Approval requests in the database: consume, create-or-reuse, decide, withdraw, expire, escalate.

The gate, the approvals API, the dashboard and the worker all go through these functions, so one
set of rules holds everywhere. None of them commits: the caller owns the transaction.

Every state change goes through record_event, which appends to the hash-chained event log
(audit.py) and writes the webhook outbox (outbox.py) in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, false, func, literal_column, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from . import audit, events, metrics, outbox
from .auth import Caller, deciding_levels
from .errors import ApiError
from .extensions import db
from .models import (
    DECIDING_ROLES,
    ApiToken,
    ApprovalEvent,
    ApprovalRequest,
    ApprovalScope,
    ApprovalStatus,
    ApprovalVote,
    Membership,
    User,
    VoteDecision,
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


def status_is(status: str):
    """``status = '<literal>'``: PostgreSQL's generic plans for prepared statements can match a
    literal, not a bound parameter, to the partial indexes the gate's lookups rely on."""
    return ApprovalRequest.status == literal_column(f"'{ApprovalStatus(status).value}'")


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
    """Append to the hash-chained log, owe it to subscribed webhooks, and queue the live change.

    All in the caller's transaction: the event, its notifications and the state change commit
    or vanish together. Cost: the chain lock and head read (once per transaction), the insert,
    and one INSERT ... SELECT for the webhooks.
    """
    entry = audit.append(approval_id, kind, actor, detail or {})
    outbox.enqueue(approval_id, entry.id, kind, entry.created_at)
    events.queue_change(db.session(), events.ApprovalChange(approval_id, entry.id, kind))
    return entry


# ---- the gate's statements ---------------------------------------------------------------------


def _consume_statement(key: GateKey, now: datetime):
    """UPDATE one usable approval for ``key`` to consumed, RETURNING its id.

    On PostgreSQL the candidate row is locked with FOR UPDATE SKIP LOCKED, so concurrent
    retries never wait on, nor both take, the same approval.
    """
    candidate = (
        select(ApprovalRequest.id)
        .where(
            key.matches(),
            status_is(APPROVED),
            ApprovalRequest.approval_expires_at > now,
        )
        .order_by(ApprovalRequest.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    table = ApprovalRequest.__table__
    return (
        update(table)
        .where(table.c.id == candidate, table.c.status == APPROVED)
        .values(status=CONSUMED, consumed_at=now)
        .returning(table.c.id)
    )


def consume_or_find_pending(
    key: GateKey, caller: Caller, now: datetime
) -> tuple[int | None, ApprovalRequest | None]:
    """Consume a usable approval for ``key``, or else find its pending request.

    Returns (consumed id, None) or (None, the pending row or None). On PostgreSQL this is one
    statement: the consuming UPDATE runs in a CTE beside the pending lookup, so an agent polling
    a pending request costs one round trip beyond authentication. The caller's transaction
    must also carry the operation: a rollback leaves the approval usable.
    """
    if db.session.get_bind().dialect.name != "postgresql":
        approval_id = db.session.execute(_consume_statement(key, now)).scalar_one_or_none()
        pending = None if approval_id is not None else find_pending(key)
    else:
        consumed = _consume_statement(key, now).cte("consumed")
        anchor = select(literal_column("1").label("one")).subquery("anchor")
        row = db.session.execute(
            select(select(consumed.c.id).scalar_subquery().label("consumed_id"), ApprovalRequest)
            .select_from(anchor)
            .outerjoin(ApprovalRequest, and_(key.matches(), status_is(PENDING)))
        ).one()
        approval_id, pending = row.consumed_id, row.ApprovalRequest
    if approval_id is not None:
        record_event(approval_id, "consumed", caller.label)
        return approval_id, None
    return None, pending


def find_pending(key: GateKey) -> ApprovalRequest | None:
    return db.session.execute(
        select(ApprovalRequest).where(key.matches(), status_is(PENDING))
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
            status_is(DENIED),
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
    policy_version: str | None = None  # of the effective policy ``policy`` was resolved from


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
        "policy_version": new.policy_version,
        "policy_terms": new.policy.terms(),
        "approvals_required": new.policy.approvals_required,
        "escalation_level": 0,
        "escalate_at": now + new.policy.escalate_after
        if new.policy.escalate_after is not None and len(new.chain) > 1
        else None,
    }
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(ApprovalRequest)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=["workspace_id", "action", "request_hash"],
            # A literal predicate: as a bound parameter, a prepared (generic) plan could not
            # match it to the partial index and PostgreSQL would reject the ON CONFLICT.
            index_where=text("status = 'pending'"),
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


def terms_of(request: ApprovalRequest) -> ActionPolicy:
    """The policy a request was created under (the built-in entry for rows older than that)."""
    if request.policy_terms is None:
        return policy_for(request.action)
    return ActionPolicy.from_terms(request.action, request.summary, request.policy_terms)


def requester_owner_id(request: ApprovalRequest) -> int | None:
    """The human who owns the token that asked (an agent token's ``user``), if any."""
    if request.requested_by_token_id is None:
        return None
    return db.session.execute(
        select(ApiToken.user_id).where(ApiToken.id == request.requested_by_token_id)
    ).scalar_one_or_none()


def approvals_count(approval_id: int) -> int:
    return db.session.execute(
        select(func.count())
        .select_from(ApprovalVote)
        .where(
            ApprovalVote.approval_id == approval_id,
            ApprovalVote.decision == VoteDecision.APPROVE.value,
        )
    ).scalar_one()


def has_approved(approval_id: int, user_id: int) -> bool:
    return (
        db.session.execute(
            select(ApprovalVote.id).where(
                ApprovalVote.approval_id == approval_id,
                ApprovalVote.user_id == user_id,
                ApprovalVote.decision == VoteDecision.APPROVE.value,
            )
        ).first()
        is not None
    )


def decide(approval_id: int, caller: Caller, decision: str, reason: str | None) -> ApprovalRequest:
    """Vote on a pending request: humans with owner/approver rights on it or above.

    Each vote is a row. The request is approved once ``approvals_required`` distinct humans
    approved, and denied by the first denial. The row lock taken first serialises concurrent
    voters, so no vote is lost or counted twice, and none lands after a denial. A second approval
    by the same person is refused (409 already_voted) rather than silently ignored, so the
    dashboard can say so.
    """
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
    terms = terms_of(request)
    if terms.needs_reason(decision) and not reason:
        raise ApiError(
            422,
            "validation_error",
            f"reason: the policy needs a reason to {decision}",
            field="reason",
        )
    approve = decision == "approve"
    if approve and terms.forbid_requester_owner and requester_owner_id(request) == caller.user_id:
        raise ApiError(
            403,
            "requester_owner",
            "you own the token that asked; the policy needs someone else to approve",
        )
    if approve and has_approved(approval_id, caller.user_id):
        raise ApiError(
            409,
            "already_voted",
            "you already approved this request; it needs another person",
            approvals_count=approvals_count(approval_id),
            approvals_required=request.approvals_required,
        )
    db.session.add(
        ApprovalVote(
            approval_id=approval_id,
            user_id=caller.user_id,
            username=caller.name,
            decision=VoteDecision.APPROVE.value if approve else VoteDecision.DENY.value,
            level=levels[0],
            reason=reason,
            created_at=now,
        )
    )
    db.session.flush()
    detail: dict[str, Any] = {"reason": reason, "level": levels[0]}
    if approve:
        count = approvals_count(approval_id)
        detail.update(approvals=count, required=request.approvals_required)
        if count < request.approvals_required:
            record_event(approval_id, "voted", caller.label, detail)
            return request
    request.decided_at = now
    request.decided_by_user_id = caller.user_id
    request.decided_by_name = caller.name
    request.decided_level = levels[0]
    request.reason = reason
    if approve:
        request.status = APPROVED
        request.approval_expires_at = now + terms.approval_ttl
    else:
        request.status = DENIED
    request.escalate_at = None
    db.session.flush()
    record_event(approval_id, "approved" if approve else "denied", caller.label, detail)
    metrics.observe_decision(request.action, decision, (now - request.created_at).total_seconds())
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


def _expire_where(status: str, deadline, limit: int, detail: dict[str, Any]) -> int:
    """Move rows in ``status`` past ``deadline`` to expired, one event each.

    Rows are claimed with FOR UPDATE SKIP LOCKED and the UPDATE re-checks the status, so
    several workers at once never expire one request twice.
    """
    due = (
        select(ApprovalRequest.id)
        .where(ApprovalRequest.status == status, deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(
        db.session.execute(
            update(ApprovalRequest)
            .where(ApprovalRequest.id.in_(due.scalar_subquery()), ApprovalRequest.status == status)
            .values(status=EXPIRED)
            .returning(ApprovalRequest.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    for approval_id in ids:
        record_event(approval_id, "expired", "system", detail)
    return len(ids)


def expire_due(now: datetime | None = None, limit: int = 500) -> int:
    """Expire pending requests past their deadline, one event each. Safe with several workers."""
    now = now or utcnow()
    return _expire_where(PENDING, ApprovalRequest.expires_at <= now, limit, {})


def expire_stale_approvals(now: datetime | None = None, limit: int = 500) -> int:
    """Mark granted approvals past their usable window expired, one event each.

    They already read as expired (effective_status) and cannot be consumed; this makes the
    stored state and the event log say so. Safe with several workers, like expire_due.
    """
    now = now or utcnow()
    return _expire_where(
        APPROVED, ApprovalRequest.approval_expires_at <= now, limit, {"stage": "approved"}
    )


def escalate_due(now: datetime | None = None, limit: int = 100) -> int:
    """Escalate requests pending past their ``escalate_after`` one level up the tree.

    The event names the ancestor now called upon and its approvers; webhooks subscribed to
    "escalated" on the request's workspace or above receive it. The next escalation is due
    ``escalate_after`` later, until the root. Rows are claimed FOR UPDATE SKIP LOCKED, and the
    re-checked status means a request decided meanwhile is never escalated.
    """
    now = now or utcnow()
    due = db.session.execute(
        select(ApprovalRequest)
        .where(
            ApprovalRequest.status == PENDING,
            ApprovalRequest.escalate_at.is_not(None),
            ApprovalRequest.escalate_at <= now,
            ApprovalRequest.expires_at > now,
        )
        .order_by(ApprovalRequest.escalate_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).scalars()
    escalated = 0
    for request in list(due):
        top = len(request.workspace_path) - 1  # the root's level
        level = min(request.escalation_level + 1, top)
        target = request.workspace_path[top - level]  # the path is root-first
        after = terms_of(request).escalate_after
        request.escalation_level = level
        request.escalate_at = now + after if after is not None and level < top else None
        db.session.flush()
        record_event(
            request.id,
            "escalated",
            "system",
            {
                "level": level,
                "workspace": {"id": target["id"], "name": target["name"]},
                "approvers": approvers_of(target["id"]),
            },
        )
        escalated += 1
    return escalated


def approvers_of(workspace_id: int) -> list[str]:
    """Usernames holding an owner/approver role on the workspace itself."""
    return list(
        db.session.execute(
            select(User.username)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.workspace_id == workspace_id, Membership.role.in_(DECIDING_ROLES))
            .order_by(User.username)
        ).scalars()
    )


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
        "approvals_required": request.approvals_required,
        "approvals_count": sum(v.decision == VoteDecision.APPROVE.value for v in request.votes),
        "votes": [vote_json(v) for v in request.votes],
        "escalation_level": request.escalation_level,
        "next_escalation_at": request.escalate_at.isoformat()
        if request.escalate_at and effective_status(request, now) == PENDING
        else None,
        "policy_version": request.policy_version,
    }


def vote_json(vote: ApprovalVote) -> dict[str, Any]:
    return {
        "user": vote.username,
        "decision": vote.decision,
        "level": vote.level,
        "reason": vote.reason,
        "created_at": vote.created_at.isoformat(),
    }
