"""Workspaces: a tree. Deleting one (and its subtree) is gated."""

from __future__ import annotations

from typing import Any

from flask import g
from sqlalchemy import delete, select

from ..auth import Access, Caller, global_access, require_workspace, subtree_ids
from ..errors import ApiError
from ..extensions import db
from ..gate import GateSubject, gate_destructive
from ..models import Membership, Workspace
from . import bp, parse_body, query_flag
from .schemas import WorkspaceCreate


def workspace_json(ws: Workspace) -> dict[str, Any]:
    return {
        "id": ws.id,
        "name": ws.name,
        "parent_id": ws.parent_id,
        "created_at": ws.created_at.isoformat(),
    }


def visible_workspace_ids(caller: Caller) -> list[int] | None:
    """Ids the caller may read, or None for every workspace (unscoped tokens)."""
    if not caller.is_human:
        if caller.scope_workspace_id is None:
            return None
        return subtree_ids(caller.scope_workspace_id)
    roots = db.session.execute(
        select(Membership.workspace_id).where(Membership.user_id == caller.user_id)
    ).scalars()
    seen: set[int] = set()
    for root in roots:
        if root not in seen:
            seen.update(subtree_ids(root))
    return sorted(seen)


@bp.post("/workspaces")
def create_workspace():
    """Create a workspace under a parent the caller manages (or a root, for unscoped tokens)."""
    body = parse_body(WorkspaceCreate)
    if body.parent_id is not None:
        require_workspace(g.caller, body.parent_id, Access.MANAGE)
    elif global_access(g.caller) < Access.MANAGE:
        raise ApiError(
            403, "forbidden", "only an unscoped service or agent token may create a root workspace"
        )
    workspace = Workspace(name=body.name, parent_id=body.parent_id)
    db.session.add(workspace)
    db.session.commit()
    return workspace_json(workspace), 201


@bp.get("/workspaces")
def list_workspaces():
    """Every workspace the caller may read."""
    ids = visible_workspace_ids(g.caller)
    query = select(Workspace).order_by(Workspace.id)
    if ids is not None:
        query = query.where(Workspace.id.in_(ids))
    return {"workspaces": [workspace_json(ws) for ws in db.session.execute(query).scalars()]}


@bp.get("/workspaces/<id:workspace_id>")
def get_workspace(workspace_id: int):
    """One workspace with its path and children."""
    chain = require_workspace(g.caller, workspace_id, Access.READ)
    children = db.session.execute(
        select(Workspace).where(Workspace.parent_id == workspace_id).order_by(Workspace.id)
    ).scalars()
    return {
        **workspace_json(chain[0]),
        "path": [{"id": ws.id, "name": ws.name} for ws in reversed(chain)],
        "children": [workspace_json(child) for child in children],
    }


def locked_subtree_ids(workspace_id: int) -> list[int]:
    """The subtree's ids, with every row locked until the transaction ends.

    Creating a child takes a key-share lock on its parent, which our FOR UPDATE blocks: once
    the set is stable under lock, no child can join it before the delete commits, so the
    approved subtree is exactly what goes. (SQLite has one writer at a time anyway.)
    """
    ids = set(subtree_ids(workspace_id))
    while True:
        db.session.execute(select(Workspace.id).where(Workspace.id.in_(ids)).with_for_update())
        again = set(subtree_ids(workspace_id))
        if again == ids:
            return sorted(ids)
        ids = again


def subtree_description(workspace_id: int) -> list[dict[str, Any]]:
    """The workspaces a delete would remove, parents before children."""
    ids = subtree_ids(workspace_id)
    rows = db.session.execute(select(Workspace).where(Workspace.id.in_(ids)).order_by(Workspace.id))
    return [{"id": ws.id, "name": ws.name, "parent_id": ws.parent_id} for ws in rows.scalars()]


def describe_workspace_delete(workspace_id: int) -> GateSubject:
    chain = require_workspace(g.caller, workspace_id, Access.MANAGE)
    recursive = query_flag("recursive")
    subtree = subtree_description(workspace_id)
    if len(subtree) > 1 and not recursive:
        raise ApiError(
            409,
            "has_children",
            "this workspace has children; pass ?recursive=true to delete the subtree",
        )
    # The subtree is part of the hash: an approval to delete 3 workspaces cannot delete 4.
    g.described_subtree = {ws["id"] for ws in subtree}
    return GateSubject(
        chain=chain,
        target={"workspace_id": workspace_id, "recursive": recursive, "subtree": subtree},
        summary_fields={
            "recursive_note": f" and its {len(subtree) - 1} descendant(s)"
            if len(subtree) > 1
            else ""
        },
    )


@bp.delete("/workspaces/<id:workspace_id>")
@gate_destructive("workspace.delete", describe=describe_workspace_delete)
def delete_workspace(workspace_id: int):
    """Delete a workspace (and, with ?recursive=true, its subtree)."""
    # Lock what goes and check it is what was described (and, if gated, approved): a child
    # created in between would otherwise be deleted by the cascade without anyone's consent.
    if set(locked_subtree_ids(workspace_id)) != g.described_subtree:
        raise ApiError(409, "subtree_changed", "the subtree changed while deleting; retry")
    # ON DELETE CASCADE takes the subtree, its secrets, members and tokens with it.
    db.session.execute(delete(Workspace).where(Workspace.id == workspace_id))
    db.session.commit()
    return "", 204
