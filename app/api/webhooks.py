"""Webhooks of a workspace: signed notifications of its subtree's approval events.

Only the workspace's owners (humans with manage rights) and service tokens may manage them:
an agent must not learn, redirect or silence the notifications about its own requests. The
signing secret is shown once, in the 201.
"""

from __future__ import annotations

from typing import Any

from flask import g, request
from sqlalchemy import delete, select

from .. import outbox
from ..auth import Access, Caller, require_workspace
from ..errors import ApiError
from ..extensions import db
from ..gate import not_gated
from ..models import ApprovalEvent, OutboxAttempt, OutboxMessage, TokenKind, Webhook
from . import bp, parse_body
from .schemas import WebhookCreate

DELIVERY_STATUSES = (outbox.PENDING, outbox.DELIVERED, outbox.DEAD)


def webhook_json(webhook: Webhook) -> dict[str, Any]:
    """Everything but the secret."""
    return {
        "id": webhook.id,
        "workspace_id": webhook.workspace_id,
        "url": webhook.url,
        "format": webhook.format,
        "events": outbox.event_names(webhook.event_mask),
        "created_by": webhook.created_by,
        "created_at": webhook.created_at.isoformat(),
    }


def require_webhook_manager(workspace_id: int) -> None:
    """Owner rights on the workspace (or above), or a service token in scope; never an agent."""
    caller: Caller = g.caller
    require_workspace(caller, workspace_id, Access.MANAGE)
    if caller.kind == TokenKind.AGENT.value:
        raise ApiError(403, "forbidden", "agents may not manage webhooks")


def find_webhook(workspace_id: int, webhook_id: int) -> Webhook:
    found = db.session.execute(
        select(Webhook).where(Webhook.id == webhook_id, Webhook.workspace_id == workspace_id)
    ).scalar_one_or_none()
    if found is None:
        raise ApiError(404, "not_found", f"webhook {webhook_id} not found in this workspace")
    return found


@bp.post("/workspaces/<id:workspace_id>/webhooks")
def create_webhook(workspace_id: int):
    """Register a receiver; the response carries its signing secret, once."""
    require_webhook_manager(workspace_id)
    body = parse_body(WebhookCreate)
    try:
        url = outbox.check_url(body.url)
    except ValueError as error:
        raise ApiError(422, "validation_error", f"url: {error}", field="url") from None
    webhook = Webhook(
        workspace_id=workspace_id,
        url=url,
        format=body.format,
        event_mask=outbox.event_mask(body.events),
        secret=outbox.new_secret(),
        created_by=g.caller.label,
    )
    db.session.add(webhook)
    db.session.commit()
    return {**webhook_json(webhook), "secret": webhook.secret}, 201


@bp.get("/workspaces/<id:workspace_id>/webhooks")
def list_webhooks(workspace_id: int):
    """The workspace's own webhooks (not its ancestors'), without secrets."""
    require_webhook_manager(workspace_id)
    rows = db.session.execute(
        select(Webhook).where(Webhook.workspace_id == workspace_id).order_by(Webhook.id)
    ).scalars()
    return {"webhooks": [webhook_json(webhook) for webhook in rows]}


@bp.delete("/workspaces/<id:workspace_id>/webhooks/<id:webhook_id>")
@not_gated("agents may not manage webhooks at all; owners and service tokens are not gated")
def delete_webhook(workspace_id: int, webhook_id: int):
    """Remove a webhook; its undelivered notifications go with it."""
    require_webhook_manager(workspace_id)
    find_webhook(workspace_id, webhook_id)
    db.session.execute(delete(Webhook).where(Webhook.id == webhook_id))
    db.session.commit()
    return "", 204


@bp.get("/workspaces/<id:workspace_id>/webhooks/<id:webhook_id>/deliveries")
def list_deliveries(workspace_id: int, webhook_id: int):
    """The delivery log, newest first: each notification with its attempts; ?status=, ?limit=."""
    require_webhook_manager(workspace_id)
    find_webhook(workspace_id, webhook_id)
    query = (
        select(OutboxMessage, ApprovalEvent.kind, ApprovalEvent.approval_id)
        .join(ApprovalEvent, ApprovalEvent.id == OutboxMessage.event_id)
        .where(OutboxMessage.webhook_id == webhook_id)
    )
    status = request.args.get("status")
    if status is not None:
        if status not in DELIVERY_STATUSES:
            raise ApiError(
                400,
                "bad_request",
                f"status must be one of {list(DELIVERY_STATUSES)}",
                field="status",
            )
        query = query.where(OutboxMessage.status == status)
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(400, "bad_request", "limit must be an integer from 1 to 500", field="limit")
    rows = db.session.execute(query.order_by(OutboxMessage.id.desc()).limit(int(limit))).all()
    attempts = outbox.attempts_by_message([message.id for message, _, _ in rows])
    return {
        "deliveries": [
            delivery_json(message, kind, approval_id, attempts.get(message.id, []))
            for message, kind, approval_id in rows
        ]
    }


def delivery_json(
    message: OutboxMessage, kind: str, approval_id: int, attempts: list[OutboxAttempt]
) -> dict[str, Any]:
    return {
        "id": message.id,
        "event_id": message.event_id,
        "event": kind,
        "approval_id": approval_id,
        "status": message.status,
        "attempts": message.attempts,
        "next_attempt_at": message.next_attempt_at.isoformat()
        if message.status == outbox.PENDING
        else None,
        "delivered_at": message.delivered_at.isoformat() if message.delivered_at else None,
        "last_status_code": message.last_status_code,
        "last_error": message.last_error,
        "created_at": message.created_at.isoformat(),
        "log": [
            {
                "attempt": a.attempt,
                "started_at": a.started_at.isoformat(),
                "duration_ms": a.duration_ms,
                "status_code": a.status_code,
                "error": a.error,
            }
            for a in attempts
        ],
    }
