"""@gate_destructive: the one Flask-aware layer of the gate.

For a gated caller the decorated view runs only after consuming a human approval bound to
(workspace, action, hash of the request's context and caller). Anything else answers 202
(pending), 403 (denied) or 503 (the gate could not decide: fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from flask import current_app, g, jsonify, make_response, request
from sqlalchemy.exc import SQLAlchemyError

from . import approvals, metrics
from .auth import Caller, path_label
from .errors import ApiError, describe_database_error, error_response
from .extensions import db
from .models import Workspace, utcnow
from .policy import ActionPolicy, keyed_digest, policy_for, request_hash
from .policy_file import EffectivePolicy

log = logging.getLogger("countersign.gate")


@dataclass(frozen=True)
class GateSubject:
    """What a gated request would act on, as described by the route."""

    chain: list[Workspace]  # the workspace acted in, then its ancestors
    target: dict[str, Any]  # hashed and shown to the approver
    summary_fields: dict[str, Any] = field(default_factory=dict)
    # Hashed, never stored: keyed digests of secret values.
    sealed: dict[str, str] = field(default_factory=dict)
    workspace_id: int = field(init=False)

    def __post_init__(self) -> None:
        # Read the id now: after a commit or rollback the ORM would reload chain[0], and a
        # concurrent request may have deleted that workspace by then.
        object.__setattr__(self, "workspace_id", self.chain[0].id)


def effective_policy() -> EffectivePolicy:
    """The policy loaded at startup: the built-in map, tuned by COUNTERSIGN_POLICY if set."""
    return current_app.extensions["countersign_policy"]


def resolve_policy(action: str, subject: GateSubject) -> ActionPolicy:
    """The effective policy for this action in this workspace (pure; no statement)."""
    return effective_policy().resolve(action, [(ws.id, ws.name) for ws in subject.chain])


def seal(value: str) -> str:
    """Keyed digest of a secret value, bound into the hash without being stored in clear."""
    return keyed_digest(current_app.config["SECRET_KEY"], value)


Describe = Callable[..., GateSubject | None]


def gate_destructive(action: str, *, describe: Describe):
    """Gate a view behind a human approval for the callers the policy names.

    ``describe(**view_args)`` loads and authorises the target (raising 404/403 as needed) and
    returns the GateSubject, or None when this request is not the gated action (for example a
    secret PUT that creates rather than replaces).
    """
    policy_for(action)  # an action missing from the map fails at import, i.e. at startup

    def decorator(view):
        @wraps(view)
        def gated_view(**view_args):
            caller: Caller = g.caller
            subject = describe(**view_args)
            if subject is None:
                _record(action, "passthrough", caller, subject)
                return view(**view_args)
            policy = resolve_policy(action, subject)
            if not policy.gates(caller.kind):
                _record(action, "passthrough", caller, subject)
                return view(**view_args)
            return _gate(action, policy, subject, caller, view, view_args)

        gated_view.gate_action = action  # lets tests find every gated route
        return gated_view

    return decorator


def not_gated(reason: str):
    """Mark a DELETE view as deliberately outside the gate, saying why.

    The structural test fails a DELETE route without @gate_destructive unless it carries this:
    an exemption is a reviewed decision, never an omission.
    """

    def decorator(view):
        view.gate_exempt = reason
        return view

    return decorator


def _context(action: str, subject: GateSubject, caller: Caller) -> dict[str, Any]:
    return {
        "action": action,
        "workspace": path_label(subject.chain),
        "target": subject.target,
        "caller": {"token_id": caller.token_id, "kind": caller.kind, "name": caller.name},
        **({"sealed": sorted(subject.sealed)} if subject.sealed else {}),
    }


def _gate(
    action: str,
    policy: ActionPolicy,
    subject: GateSubject,
    caller: Caller,
    view,
    view_args: dict[str, Any],
):
    now = utcnow()
    digest = request_hash(
        action, subject.workspace_id, {**subject.target, **subject.sealed}, caller.token_id or 0
    )
    key = approvals.GateKey(subject.workspace_id, action, digest)
    idempotency_key = _idempotency_key()
    try:
        if idempotency_key is not None:
            earlier = approvals.hash_for_idempotency_key(caller, idempotency_key)
            if earlier is not None and earlier != digest:
                raise ApiError(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was already used for a different request",
                )
        consumed_id, pending = approvals.consume_or_find_pending(key, caller, now)
    except ApiError:
        raise
    except Exception as error:  # whatever went wrong, the operation must not run
        return _fail_closed(action, "consume", caller, subject, error)
    if consumed_id is not None:
        # The view commits the operation and the consumption together; if it fails, the
        # rollback leaves the approval usable.
        g.consumed_approval_id = consumed_id
        response = make_response(view(**view_args))
        if response.status_code >= 400:
            db.session.rollback()
        outcome = "consumed" if response.status_code < 400 else "rolled_back"
        _record(action, outcome, caller, subject, consumed_id, response.status_code)
        return response

    try:
        if pending is not None and approvals.expire_if_due(pending, now):
            pending = None
        if pending is None:
            denial = approvals.find_recent_denial(key, policy, now)
            if denial is not None:
                # Build the answer before committing: reading the row afterwards would cost a
                # checkout and a reload.
                refusal = error_response(
                    403,
                    "approval_denied",
                    "a human denied this request",
                    approval_id=denial.id,
                    reason=denial.reason,
                )
                denial_id = denial.id
                db.session.commit()
                _record(action, "denied", caller, subject, denial_id)
                return refusal
            summary = policy.describe(
                {"workspace_path": path_label(subject.chain), **subject.summary_fields}
            )
            pending, _ = approvals.create_or_reuse_pending(
                approvals.NewRequest(
                    key,
                    policy,
                    summary,
                    _context(action, subject, caller),
                    subject.chain,
                    idempotency_key,
                    effective_policy().version,
                ),
                caller,
                now,
            )
        accepted, pending_id = _accepted(pending), pending.id  # before the commit expires it
        db.session.commit()
    except ApiError:
        raise
    except Exception as error:  # database down, bad policy template, ...: fail closed
        return _fail_closed(action, "pending", caller, subject, error)
    _record(action, "pending", caller, subject, pending_id)
    return accepted


def _idempotency_key() -> str | None:
    """The Idempotency-Key header: 1-255 printable ASCII characters, else 400."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
        raise ApiError(
            400, "bad_request", "Idempotency-Key must be 1-255 printable ASCII characters"
        )
    return key


def _accepted(pending) -> Any:
    status_url = f"/api/approvals/{pending.id}"
    response = make_response(
        jsonify(
            {
                "status": "pending",
                "approval_id": pending.id,
                "action": pending.action,
                "workspace_id": pending.workspace_id,
                "summary": pending.summary,
                "expires_at": pending.expires_at.isoformat(),
                "status_url": status_url,
            }
        ),
        202,
    )
    response.headers["Location"] = status_url
    response.headers["Retry-After"] = str(current_app.config["COUNTERSIGN_RETRY_AFTER"])
    return response


def _record(
    action: str,
    outcome: str,
    caller: Caller,
    subject: GateSubject | None,
    approval_id: int | None = None,
    status: int | None = None,
) -> None:
    """One structured log line and one metric per gate decision (ids only, never secrets)."""
    metrics.record_gate(action, outcome)
    log.info(
        "gate %s",
        outcome,
        extra={
            "outcome": outcome,
            "action": action,
            "approval_id": approval_id,
            "workspace_id": subject.workspace_id if subject else None,
            "caller_kind": caller.kind,
            "caller_token_id": caller.token_id,
            "status": status,
        },
    )


def _fail_closed(
    action: str, stage: str, caller: Caller, subject: GateSubject, error: BaseException
):
    try:
        db.session.rollback()
    except SQLAlchemyError:
        log.warning("rollback after gate failure failed too")
    log.exception("gate failed closed at %s", stage)
    _record(action, "failed_closed", caller, subject)
    reason = (
        describe_database_error(error)
        if isinstance(error, SQLAlchemyError)
        else "the approval gate could not decide"
    )
    return error_response(503, "gate_unavailable", f"{reason}; nothing was done")
