"""Oversight pages: the audit chain's status with the latest events, and a workspace's webhooks
with their delivery log (read-only; managing webhooks stays in the API)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import abort, g
from sqlalchemy import func, select

from .. import approvals, audit, outbox
from ..auth import Access, access_on_chain, ancestor_chain, path_label, subtree_ids
from ..extensions import db
from ..models import (
    ApprovalEvent,
    ApprovalRequest,
    Membership,
    OutboxAttempt,
    OutboxMessage,
    Role,
    Webhook,
    utcnow,
)
from ..outbox import event_names
from . import bp
from .access import current_caller
from .views import render_page

AUDIT_EVENTS = 50
DELIVERIES_PER_WEBHOOK = 25


# ---- audit ---------------------------------------------------------------------------------


@bp.get("/audit")
def audit_log():
    """The chain's status (global: hashes and ids disclose nothing) and the events the user may see.

    verify() walks the whole chain on every view: that is the point of the page, and it reads in
    batches so memory stays flat.
    """
    status = audit.verify()
    total = db.session.execute(select(func.count(ApprovalEvent.id))).scalar_one()
    head = db.session.execute(
        select(ApprovalEvent.hash).order_by(ApprovalEvent.id.desc()).limit(1)
    ).scalar_one_or_none()
    events = list(
        db.session.execute(
            select(ApprovalEvent)
            .join(ApprovalRequest, ApprovalRequest.id == ApprovalEvent.approval_id)
            .where(approvals.visible_to(current_caller()))
            .order_by(ApprovalEvent.id.desc())
            .limit(AUDIT_EVENTS)
        ).scalars()
    )
    return render_page("dashboard/audit.html", status=status, total=total, head=head, events=events)


# ---- webhooks ------------------------------------------------------------------------------


@bp.app_template_global()
def owned_workspace_ids() -> set[int]:
    """Workspaces the user owns, directly or through an ancestor: where the webhook link shows."""
    owned: set[int] = set()
    for workspace_id in db.session.execute(
        select(Membership.workspace_id).where(
            Membership.user_id == g.user.id, Membership.role == Role.OWNER.value
        )
    ).scalars():
        if workspace_id not in owned:
            owned.update(subtree_ids(workspace_id))
    return owned


@dataclass
class Delivery:
    message: OutboxMessage
    kind: str
    approval_id: int
    log: list[OutboxAttempt]


@dataclass
class Hook:
    webhook: Webhook
    events: list[str]
    deliveries: list[Delivery]


def deliveries_of(webhook_id: int) -> list[Delivery]:
    """The webhook's latest notifications, newest first, each with its attempts (oldest first)."""
    rows = db.session.execute(
        select(OutboxMessage, ApprovalEvent.kind, ApprovalEvent.approval_id)
        .join(ApprovalEvent, ApprovalEvent.id == OutboxMessage.event_id)
        .where(OutboxMessage.webhook_id == webhook_id)
        .order_by(OutboxMessage.id.desc())
        .limit(DELIVERIES_PER_WEBHOOK)
    ).all()
    attempts = outbox.attempts_by_message([message.id for message, _, _ in rows])
    return [
        Delivery(message, kind, approval_id, attempts.get(message.id, []))
        for message, kind, approval_id in rows
    ]


@bp.get("/workspaces/<id:workspace_id>/webhooks")
def webhooks(workspace_id: int):
    """A workspace's own webhooks (never their secrets) and their delivery log, for its owners."""
    chain = ancestor_chain(workspace_id)
    if not chain:
        abort(404)
    if access_on_chain(current_caller(), chain) < Access.MANAGE:
        abort(
            403,
            description="Webhooks and their deliveries are shown to the owners of the workspace "
            "(or of a workspace above it) only.",
        )
    hooks = [
        Hook(webhook, event_names(webhook.event_mask), deliveries_of(webhook.id))
        for webhook in db.session.execute(
            select(Webhook).where(Webhook.workspace_id == workspace_id).order_by(Webhook.id)
        ).scalars()
    ]
    return render_page(
        "dashboard/webhooks.html",
        workspace=chain[0],
        path=path_label(chain),
        hooks=hooks,
        now=utcnow(),
    )
