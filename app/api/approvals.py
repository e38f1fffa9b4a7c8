"""Approval requests: list, read, decide (humans only), withdraw (the requester only)."""

from __future__ import annotations

import time

from flask import current_app, g, request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from .. import approvals, events
from ..errors import ApiError
from ..extensions import db
from ..models import ApprovalRequest, ApprovalStatus, utcnow
from . import bp, parse_body
from .schemas import Decision

STATUSES = {s.value for s in ApprovalStatus}


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(
            400, "bad_request", f"{name} must be an integer from {low} to {high}", field=name
        )
    return int(raw)


@bp.get("/approvals")
def list_approvals():
    """Approval requests the caller may see, newest first; ?status=, ?workspace_id=, ?limit=."""
    now = utcnow()
    query = (
        select(ApprovalRequest)
        .where(approvals.visible_to(g.caller))
        .options(selectinload(ApprovalRequest.votes))  # one query for all rows' votes
    )
    status = request.args.get("status")
    if status:
        if status not in STATUSES:
            raise ApiError(
                400, "bad_request", f"status must be one of {sorted(STATUSES)}", field="status"
            )
        query = query.where(approvals.status_filter(status, now))
    if "workspace_id" in request.args:
        query = query.where(
            ApprovalRequest.workspace_id == _int_arg("workspace_id", 0, 1, 2**31 - 1)
        )
    limit = _int_arg("limit", 100, 1, 500)
    rows = db.session.execute(query.order_by(ApprovalRequest.id.desc()).limit(limit)).scalars()
    return {"approvals": [approvals.to_json(r, now) for r in rows]}


def _visible_approval(approval_id: int) -> ApprovalRequest:
    found = db.session.execute(
        select(ApprovalRequest).where(
            ApprovalRequest.id == approval_id, approvals.visible_to(g.caller)
        )
    ).scalar_one_or_none()
    if found is None:
        raise ApiError(404, "not_found", f"approval {approval_id} not found")
    return found


MAX_WAIT_SECONDS = 60


def _wait_seconds() -> float:
    """?wait=N: seconds to long-poll, capped at 60; 400 unless a non-negative number."""
    raw = request.args.get("wait")
    if raw is None:
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ApiError(400, "bad_request", "wait must be a number of seconds (0-60)", field="wait")
    return min(seconds, MAX_WAIT_SECONDS)


def _wait_while_pending(
    approval_id: int, found: ApprovalRequest, seconds: float
) -> ApprovalRequest:
    """Block until the request changes (decided, or a vote or escalation recorded) or the wait
    ends, holding no database connection; the caller polls again while it is still pending.

    Woken by the same change events that drive the dashboard (LISTEN/NOTIFY on PostgreSQL), so
    waiting costs a thread, not a pooled connection and not a polling loop.
    """
    deadline = time.monotonic() + min(
        seconds, max(0.0, (found.expires_at - utcnow()).total_seconds())
    )
    with events.publisher_of(current_app).hub.subscribe("longpoll") as subscription:
        # Re-read after subscribing so a decision made in between is not missed.
        db.session.expire_all()
        found = _visible_approval(approval_id)
        while approvals.effective_status(found) == approvals.PENDING:
            db.session.remove()  # give the connection back to the pool while we wait
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            change = subscription.get(timeout=remaining)
            if change is None:
                break
            if change.approval_id == approval_id:
                break  # it changed: answer now (progress such as "1 of 2" reaches the agent)
            if change == events.RESYNC:  # the listener reconnected: we may have missed one
                found = _visible_approval(approval_id)
        return _visible_approval(approval_id)


@bp.get("/approvals/<id:approval_id>")
def get_approval(approval_id: int):
    """One request with its decision and event timeline; ?wait=N long-polls while pending."""
    seconds = _wait_seconds()
    found = _visible_approval(approval_id)
    if seconds > 0 and approvals.effective_status(found) == approvals.PENDING:
        found = _wait_while_pending(approval_id, found, seconds)
    return {
        **approvals.to_json(found),
        "events": [
            {
                "id": e.id,
                "kind": e.kind,
                "actor": e.actor,
                "detail": e.detail,
                "created_at": e.created_at.isoformat(),
            }
            for e in approvals.events_of(approval_id)
        ],
    }


@bp.post("/approvals/<id:approval_id>/decision")
def decide_approval(approval_id: int):
    """Approve or deny: humans with owner/approver rights on the workspace or an ancestor."""
    if not g.caller.is_human:
        raise ApiError(403, "forbidden", "only a human may decide an approval")
    body = parse_body(Decision)
    if body.decision == "deny" and not body.reason:
        raise ApiError(422, "validation_error", "reason: a denial needs a reason", field="reason")
    decided = approvals.to_json(approvals.decide(approval_id, g.caller, body.decision, body.reason))
    db.session.commit()  # after serialising: reading the row back would cost another round trip
    return decided


@bp.post("/approvals/<id:approval_id>/withdraw")
def withdraw_approval(approval_id: int):
    """The requesting caller takes back its own pending request."""
    withdrawn = approvals.to_json(approvals.withdraw(approval_id, g.caller))
    db.session.commit()
    return withdrawn
