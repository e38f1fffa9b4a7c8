"""Secrets of a workspace. Values go in, never come out; replacing or deleting one is gated."""

from __future__ import annotations

import re
from typing import Any

from flask import g
from sqlalchemy import select

from ..auth import Access, require_workspace
from ..errors import ApiError
from ..extensions import db
from ..gate import GateSubject, gate_destructive, seal
from ..models import Secret, utcnow
from . import bp, delete_described, parse_body
from .schemas import SecretPut

SECRET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def secret_json(secret: Secret) -> dict[str, Any]:
    """Name and timestamps only: a secret's value is never echoed back."""
    return {
        "workspace_id": secret.workspace_id,
        "name": secret.name,
        "created_at": secret.created_at.isoformat(),
        "updated_at": secret.updated_at.isoformat(),
    }


def check_name(name: str) -> None:
    if not SECRET_NAME.fullmatch(name):
        raise ApiError(
            422, "validation_error", "name: use 1-128 of A-Z a-z 0-9 _ . -", field="name"
        )


def find_secret(workspace_id: int, name: str) -> Secret | None:
    return db.session.execute(
        select(Secret).where(Secret.workspace_id == workspace_id, Secret.name == name)
    ).scalar_one_or_none()


@bp.get("/workspaces/<id:workspace_id>/secrets")
def list_secrets(workspace_id: int):
    """Secret names and timestamps (never values)."""
    require_workspace(g.caller, workspace_id, Access.READ)
    rows = db.session.execute(
        select(Secret).where(Secret.workspace_id == workspace_id).order_by(Secret.name)
    ).scalars()
    return {"secrets": [secret_json(secret) for secret in rows]}


def describe_secret_put(workspace_id: int, name: str) -> GateSubject | None:
    """Creating a secret is not gated; overwriting an existing value is (secret.replace)."""
    check_name(name)
    chain = require_workspace(g.caller, workspace_id, Access.MANAGE)
    body = parse_body(SecretPut)
    if find_secret(workspace_id, name) is None:
        return None
    return GateSubject(
        chain=chain,
        target={"secret": name},
        summary_fields={"secret_name": name},
        sealed={"value_hmac": seal(body.value)},
    )


@bp.put("/workspaces/<id:workspace_id>/secrets/<name>")
@gate_destructive("secret.replace", describe=describe_secret_put)
def put_secret(workspace_id: int, name: str):
    """Create (201) or replace (200) a secret's value."""
    body = parse_body(SecretPut)
    secret = find_secret(workspace_id, name)
    status = 200
    if secret is None:
        secret = Secret(workspace_id=workspace_id, name=name, value=body.value)
        db.session.add(secret)
        status = 201
    else:
        secret.value = body.value
        secret.updated_at = utcnow()
    db.session.commit()
    return secret_json(secret), status


def describe_secret_delete(workspace_id: int, name: str) -> GateSubject:
    check_name(name)
    chain = require_workspace(g.caller, workspace_id, Access.MANAGE)
    g.secret = find_secret(workspace_id, name)  # the view deletes this row; no second lookup
    if g.secret is None:
        raise ApiError(404, "not_found", f"secret {name!r} not found")
    return GateSubject(chain=chain, target={"secret": name}, summary_fields={"secret_name": name})


@bp.delete("/workspaces/<id:workspace_id>/secrets/<name>")
@gate_destructive("secret.delete", describe=describe_secret_delete)
def delete_secret(workspace_id: int, name: str):
    """Delete a secret."""
    delete_described(g.secret, f"secret {name!r}")
    db.session.commit()
    return "", 204
