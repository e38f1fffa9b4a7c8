"""Workspace members and their roles. Removing a member is gated."""

from __future__ import annotations

from typing import Any

from flask import g
from sqlalchemy import select

from ..auth import Access, require_workspace
from ..errors import ApiError
from ..extensions import db
from ..gate import GateSubject, gate_destructive
from ..models import Membership, User
from . import bp, delete_described, parse_body
from .schemas import MemberPut


def member_json(membership: Membership) -> dict[str, Any]:
    return {
        "workspace_id": membership.workspace_id,
        "username": membership.user.username,
        "role": membership.role,
        "created_at": membership.created_at.isoformat(),
    }


def find_user(username: str) -> User:
    user = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise ApiError(404, "not_found", f"user {username!r} not found")
    return user


def find_membership(workspace_id: int, user_id: int) -> Membership | None:
    return db.session.execute(
        select(Membership).where(
            Membership.workspace_id == workspace_id, Membership.user_id == user_id
        )
    ).scalar_one_or_none()


@bp.get("/workspaces/<id:workspace_id>/members")
def list_members(workspace_id: int):
    """Members of this workspace (not inherited ones)."""
    require_workspace(g.caller, workspace_id, Access.READ)
    rows = db.session.execute(
        select(Membership).where(Membership.workspace_id == workspace_id).order_by(Membership.id)
    ).scalars()
    return {"members": [member_json(m) for m in rows]}


@bp.put("/workspaces/<id:workspace_id>/members/<username>")
def put_member(workspace_id: int, username: str):
    """Add a member (201) or change their role (200)."""
    require_workspace(g.caller, workspace_id, Access.MANAGE)
    body = parse_body(MemberPut)
    user = find_user(username)
    membership = find_membership(workspace_id, user.id)
    status = 200
    if membership is None:
        membership = Membership(workspace_id=workspace_id, user_id=user.id, role=body.role)
        db.session.add(membership)
        status = 201
    else:
        membership.role = body.role
    db.session.commit()
    return member_json(membership), status


def describe_member_remove(workspace_id: int, username: str) -> GateSubject:
    chain = require_workspace(g.caller, workspace_id, Access.MANAGE)
    user = find_user(username)
    g.membership = find_membership(workspace_id, user.id)  # the view deletes this row
    if g.membership is None:
        raise ApiError(
            404, "not_found", f"{username!r} is not a member of workspace {workspace_id}"
        )
    return GateSubject(
        chain=chain,
        target={"user_id": user.id, "username": username},
        summary_fields={"username": username, "role": g.membership.role},
    )


@bp.delete("/workspaces/<id:workspace_id>/members/<username>")
@gate_destructive("member.remove", describe=describe_member_remove)
def remove_member(workspace_id: int, username: str):
    """Remove a member from the workspace."""
    delete_described(g.membership, f"{username!r} as a member of workspace {workspace_id}")
    db.session.commit()
    return "", 204
