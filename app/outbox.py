"""Durable, signed webhook notifications: an outbox written with each event, drained by the worker.

``enqueue`` runs inside the transaction that records an approval event (approvals.record_event),
as one INSERT ... SELECT over the webhooks on the request's workspace and its ancestors (the
request's approval_scopes rows). So a notification exists exactly when its event does.

``deliver_due`` (the worker) claims one due message at a time with a lease (FOR UPDATE SKIP
LOCKED on PostgreSQL), posts it outside any transaction with short timeouts, logs the attempt,
and either marks it delivered, schedules a retry with exponential backoff and jitter, or moves it
to the dead-letter state after the last try. A killed worker's claim lapses with its lease and
another worker picks the message up. Delivery is at least once: receivers de-duplicate on the
``X-Countersign-Delivery`` header, which is the same on every retry.

Signature header: ``X-Countersign-Signature: t=<unix seconds>,v1=<hex>``, where the hex is
HMAC-SHA256 keyed with the webhook's secret over ``t + "." + body``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import insert, literal, or_, select, update

from .extensions import db
from .models import (
    ApprovalEvent,
    ApprovalRequest,
    ApprovalScope,
    OutboxAttempt,
    OutboxMessage,
    OutboxStatus,
    UTCDateTime,
    Webhook,
    WebhookFormat,
    utcnow,
)

log = logging.getLogger("countersign.outbox")

# Event kinds a webhook may subscribe to; "decided" is shorthand for approved + denied.
EVENT_BITS = {
    "created": 1,
    "voted": 2,
    "escalated": 4,
    "approved": 8,
    "denied": 16,
    "consumed": 32,
    "expired": 64,
    "withdrawn": 128,
}
ALIASES = {"decided": ("approved", "denied")}
SIGNATURE_HEADER = "X-Countersign-Signature"
DELIVERY_HEADER = "X-Countersign-Delivery"
EVENT_HEADER = "X-Countersign-Event"
MAX_URL_LENGTH = 2048
SIGNATURE_TOLERANCE = 300  # seconds a receiver should accept between signing and receipt

PENDING = OutboxStatus.PENDING.value
DELIVERED = OutboxStatus.DELIVERED.value
DEAD = OutboxStatus.DEAD.value


# ---- subscriptions and targets -----------------------------------------------------------------


def event_mask(names: Iterable[str]) -> int:
    """The bit mask for event names (aliases expanded); ValueError naming an unknown one."""
    mask = 0
    for name in names:
        for kind in ALIASES.get(name, (name,)):
            if kind not in EVENT_BITS:
                known = ", ".join([*EVENT_BITS, *ALIASES])
                raise ValueError(f"unknown event {name!r} (known: {known})")
            mask |= EVENT_BITS[kind]
    return mask


def event_names(mask: int) -> list[str]:
    return [name for name, bit in EVENT_BITS.items() if mask & bit]


def check_url(url: str) -> str:
    """A webhook target: http(s), a host, no credentials, printable ASCII, at most 2048 chars."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError("the URL must be printable ASCII without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL must use http or https")
    if "@" in parts.netloc:
        raise ValueError("the URL must not carry credentials; receivers verify the signature")
    if not parts.hostname:
        raise ValueError("the URL needs a host")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    return url


def new_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


# ---- the outbox write (hot path: one statement per event) --------------------------------------


def enqueue(approval_id: int, event_id: int, kind: str, now: datetime) -> None:
    """Owe the event to every subscribed webhook on the request's workspace or its ancestors."""
    bit = EVENT_BITS.get(kind)
    if bit is None:
        return
    subscribers = (
        select(
            Webhook.id,
            literal(event_id),
            literal(PENDING),
            literal(0),
            literal(now, UTCDateTime),
            literal(now, UTCDateTime),
        )
        .join(ApprovalScope, ApprovalScope.workspace_id == Webhook.workspace_id)
        .where(ApprovalScope.approval_id == approval_id, Webhook.event_mask.bitwise_and(bit) != 0)
    )
    db.session.execute(
        insert(OutboxMessage).from_select(
            ["webhook_id", "event_id", "status", "attempts", "next_attempt_at", "created_at"],
            subscribers,
        )
    )


# ---- signing -----------------------------------------------------------------------------------


def attempts_by_message(message_ids: list[int]) -> dict[int, list[OutboxAttempt]]:
    """The delivery log of some messages, in one query: message id -> attempts, oldest first."""
    attempts: dict[int, list[OutboxAttempt]] = {}
    if message_ids:
        for attempt in db.session.execute(
            select(OutboxAttempt)
            .where(OutboxAttempt.message_id.in_(message_ids))
            .order_by(OutboxAttempt.id)
        ).scalars():
            attempts.setdefault(attempt.message_id, []).append(attempt)
    return attempts


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    tolerance: int = SIGNATURE_TOLERANCE,
    now: float | None = None,
) -> bool:
    """What a receiver does: recompute the HMAC and refuse stale timestamps (replays)."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in fields.get("v1", []))


# ---- bodies ------------------------------------------------------------------------------------


def payload(
    message_id: int, event: ApprovalEvent, request: ApprovalRequest, public_url: str = ""
) -> dict[str, Any]:
    """The JSON body: the event and the request's fixed facts (not its current, moving state)."""
    return {
        "delivery_id": message_id,
        "event": event.kind,
        "event_id": event.id,
        "occurred_at": event.created_at.isoformat(),
        "actor": event.actor,
        "detail": event.detail,
        "approval": {
            "id": request.id,
            "action": request.action,
            "workspace_id": request.workspace_id,
            "workspace_path": request.workspace_path,
            "summary": request.summary,
            "requested_by": {
                "token_id": request.requested_by_token_id,
                "kind": request.requested_by_kind,
                "name": request.requested_by_name,
            },
            "approvals_required": request.approvals_required,
            "policy_version": request.policy_version,
            "created_at": request.created_at.isoformat(),
            "expires_at": request.expires_at.isoformat(),
            "url": f"{public_url.rstrip('/')}/api/approvals/{request.id}",
        },
    }


def slack_text(body: dict[str, Any]) -> str:
    """One line a Slack incoming webhook can show."""
    approval, detail, kind = body["approval"], body["detail"], body["event"]
    head = f"[Countersign] approval #{approval['id']} {kind}"
    if kind == "created":
        need = approval["approvals_required"]
        head += f" by {approval['requested_by']['name']} (needs {need} approval{'s' * (need > 1)})"
    elif kind == "escalated":
        target = detail.get("workspace") or {}
        head += f" to level {detail.get('level')} ({target.get('name', '?')})"
        if detail.get("approvers"):
            head += f"; approvers: {', '.join(detail['approvers'])}"
    elif kind in ("approved", "denied", "voted"):
        head += f" by {body['actor']}"
        if "approvals" in detail:
            head += f" ({detail['approvals']} of {detail['required']})"
        if detail.get("reason"):
            head += f": {detail['reason']}"
    return f"{head}\n{approval['summary']}\n{approval['url']}"


def render(fmt: str, body: dict[str, Any]) -> bytes:
    document = {"text": slack_text(body)} if fmt == WebhookFormat.SLACK.value else body
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


# ---- delivery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliverySettings:
    timeout: float = 5.0
    max_attempts: int = 12
    backoff: float = 10.0  # seconds before the first retry; doubles per attempt
    backoff_cap: float = 3600.0
    lease: float = 60.0
    public_url: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DeliverySettings:
        return cls(
            timeout=float(config["COUNTERSIGN_WEBHOOK_TIMEOUT"]),
            max_attempts=int(config["COUNTERSIGN_WEBHOOK_MAX_ATTEMPTS"]),
            backoff=float(config["COUNTERSIGN_WEBHOOK_BACKOFF"]),
            backoff_cap=float(config["COUNTERSIGN_WEBHOOK_BACKOFF_CAP"]),
            lease=float(config["COUNTERSIGN_WEBHOOK_LEASE"]),
            public_url=config.get("COUNTERSIGN_PUBLIC_URL") or "",
        )


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: half the doubled delay, plus up to the other half at random.

    Jitter spreads the retries of many messages to one receiver that just came back.
    """
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    return delay / 2 + (rng or random).uniform(0, delay / 2)


@dataclass
class DeliveryCounts:
    delivered: int = 0
    retrying: int = 0
    dead: int = 0

    @property
    def attempted(self) -> int:
        return self.delivered + self.retrying + self.dead


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed delivery: following it would let a receiver point us elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> _Outcome:
    """POST once; never raises (the outcome carries the status code or the error)."""
    started = time.monotonic()
    status, error = None, None
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 (http/https only: check_url)
    try:
        with _opener.open(request, timeout=timeout) as response:
            status = response.status
            response.read(65536)
    except urllib.error.HTTPError as failure:
        status, error = failure.code, f"HTTP {failure.code}"
        failure.close()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as failure:
        reason = getattr(failure, "reason", failure)
        error = f"{type(failure).__name__}: {reason}"[:500]
    return _Outcome(status, error, int((time.monotonic() - started) * 1000))


def worker_id() -> str:
    """Names this worker in leases and the delivery log."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:6]}"


def deliver_due(
    settings: DeliverySettings, worker: str, limit: int = 100, now: datetime | None = None
) -> DeliveryCounts:
    """Deliver up to ``limit`` due messages, one claim at a time; commits as it goes."""
    counts = DeliveryCounts()
    for _ in range(limit):
        claimed = _claim(settings, worker, now or utcnow())
        if claimed is None:
            break
        message_id, attempt = claimed
        job = _prepare(message_id, settings)
        db.session.commit()  # no transaction (nor pooled connection) held across the HTTP call
        db.session.remove()
        if job is None:
            continue
        url, fmt, secret, kind, body = job
        sent_at = utcnow()
        encoded = render(fmt, body)
        timestamp = int(time.time())
        outcome = post(
            url,
            encoded,
            {
                "Content-Type": "application/json",
                "User-Agent": "Countersign-Webhook/1",
                SIGNATURE_HEADER: sign(secret, timestamp, encoded),
                DELIVERY_HEADER: str(message_id),
                EVENT_HEADER: kind,
            },
            settings.timeout,
        )
        state = _finish(message_id, attempt, worker, sent_at, outcome, settings)
        setattr(counts, state, getattr(counts, state) + 1)
    return counts


def _claim(settings: DeliverySettings, worker: str, now: datetime) -> tuple[int, int] | None:
    """Lease the next due message to this worker; None when nothing is due."""
    M = OutboxMessage
    due = [
        M.status == PENDING,
        M.next_attempt_at <= now,
        or_(M.lease_until.is_(None), M.lease_until < now),
    ]
    candidate = (
        select(M.id)
        .where(*due)
        .order_by(M.next_attempt_at, M.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = db.session.execute(
        update(M)
        .where(M.id == candidate, *due)
        .values(
            lease_until=now + timedelta(seconds=settings.lease),
            lease_owner=worker,
            attempts=M.attempts + 1,
        )
        .returning(M.id, M.attempts)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    db.session.commit()
    return (row.id, row.attempts) if row is not None else None


def _prepare(message_id: int, settings: DeliverySettings):
    """Everything the POST needs, read in the claim's wake: (url, format, secret, kind, body)."""
    row = db.session.execute(
        select(OutboxMessage, Webhook, ApprovalEvent, ApprovalRequest)
        .join(Webhook, Webhook.id == OutboxMessage.webhook_id)
        .join(ApprovalEvent, ApprovalEvent.id == OutboxMessage.event_id)
        .join(ApprovalRequest, ApprovalRequest.id == ApprovalEvent.approval_id)
        .where(OutboxMessage.id == message_id)
    ).one_or_none()
    if row is None:  # the webhook was deleted meanwhile (its messages went with it)
        return None
    message, webhook, event, request = row
    body = payload(message.id, event, request, settings.public_url)
    return webhook.url, webhook.format, webhook.secret, event.kind, body


def _finish(
    message_id: int,
    attempt: int,
    worker: str,
    sent_at: datetime,
    outcome: _Outcome,
    settings: DeliverySettings,
) -> str:
    """Log the attempt and move the message on: delivered, retrying, or dead."""
    now = utcnow()
    db.session.add(
        OutboxAttempt(
            message_id=message_id,
            attempt=attempt,
            started_at=sent_at,
            duration_ms=outcome.duration_ms,
            status_code=outcome.status_code,
            error=outcome.error,
            worker=worker,
        )
    )
    values: dict[str, Any] = {
        "lease_until": None,
        "lease_owner": None,
        "last_status_code": outcome.status_code,
        "last_error": outcome.error,
    }
    if outcome.ok:
        state = "delivered"
        values.update(status=DELIVERED, delivered_at=now)
    elif attempt >= settings.max_attempts:
        state = "dead"
        values.update(status=DEAD)
    else:
        state = "retrying"
        delay = retry_delay(attempt, settings.backoff, settings.backoff_cap)
        values.update(next_attempt_at=now + timedelta(seconds=delay))
    # Only while the lease is still ours: if it lapsed and another worker took over, it decides.
    db.session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id == message_id,
            OutboxMessage.lease_owner == worker,
            OutboxMessage.status == PENDING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    log.info(
        "webhook delivery %s",
        state,
        extra={"message_id": message_id, "attempt": attempt, "status": outcome.status_code},
    )
    return state
