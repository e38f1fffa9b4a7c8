"""API tokens: minted once (plaintext shown once), listed by prefix, revoked.

Minting a service token or an unscoped token, and revoking any token, are gated.
"""

from __future__ import annotations

from typing import Any

from flask import g
from sqlalchemy import select

from ..auth import Access, Caller, global_access, issue_token, require_workspace, subtree_ids
from ..errors import ApiError
from ..extensions import db
from ..gate import GateSubject, gate_destructive
from ..models import ApiToken, TokenKind, User, Workspace, utcnow
from . import bp, parse_body
from .schemas import TokenCreate


def token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "prefix": token.prefix,
        "kind": token.kind,
        "name": token.name,
        "workspace_id": token.workspace_id,
        "user": token.user.username if token.user else None,
        "created_at": token.created_at.isoformat(),
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
    }


def _scope_chain(caller: Caller, workspace_id: int | None) -> list[Workspace]:
    """The chain of the workspace a token is scoped to; unscoped needs global rights."""
    if workspace_id is not None:
        return require_workspace(caller, workspace_id, Access.MANAGE)
    if global_access(caller) < Access.MANAGE:
        raise ApiError(
            403, "forbidden", "only an unscoped service or agent token may manage unscoped tokens"
        )
    return []


def describe_token_mint(**_: Any) -> GateSubject | None:
    body = parse_body(TokenCreate)
    caller: Caller = g.caller
    user = None
    if body.kind == TokenKind.USER.value:
        if body.user is None:
            raise ApiError(422, "validation_error", "user: required for a user token", field="user")
        user = db.session.execute(
            select(User).where(User.username == body.user)
        ).scalar_one_or_none()
        if user is None:
            raise ApiError(404, "not_found", f"user {body.user!r} not found")
        # A user token carries a human's approval rights: only that human, or the unscoped
        # control plane, may mint one. An agent minting one could approve its own requests.
        if caller.user_id != user.id and not (
            caller.kind == TokenKind.SERVICE.value and caller.scope_workspace_id is None
        ):
            raise ApiError(
                403,
                "forbidden",
                "a user token can only be minted by that user or an unscoped service token",
            )
        if body.workspace_id is not None:
            require_workspace(caller, body.workspace_id, Access.READ)
        chain: list[Workspace] = []
    elif body.kind == TokenKind.AGENT.value:
        user = _agent_owner(caller, body.user)
        chain = _scope_chain(caller, body.workspace_id)
    else:
        if body.user is not None:
            raise ApiError(
                422, "validation_error", "user: a service token belongs to no user", field="user"
            )
        chain = _scope_chain(caller, body.workspace_id)
    g.token_user = user
    if not (body.kind == TokenKind.SERVICE.value or body.workspace_id is None):
        return None
    if not chain:
        chain = _root_for_unscoped(caller)
    return GateSubject(
        chain=chain,
        target={
            "kind": body.kind,
            "name": body.name,
            "workspace_id": body.workspace_id,
            "user": body.user,
        },
        summary_fields={
            "token_kind": body.kind,
            "token_name": body.name,
            "token_scope": f"workspace {body.workspace_id}" if body.workspace_id else "everything",
        },
    )


def _agent_owner(caller: Caller, username: str | None) -> User | None:
    """The human owning a new agent token: named in ``user``, or inherited from a minting agent.

    Ownership only restricts (a policy may bar the owner from approving the agent's requests),
    so the owner must be the minting human, the minting agent's own owner, or be named by a
    service token; an owned agent's tokens stay owned, so it cannot launder its requests.
    """
    if username is None:
        return db.session.get(User, caller.owner_id) if caller.owner_id is not None else None
    user = db.session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise ApiError(404, "not_found", f"user {username!r} not found")
    if caller.kind == TokenKind.SERVICE.value or user.id in (caller.user_id, caller.owner_id):
        return user
    raise ApiError(
        403,
        "forbidden",
        "an agent token's owner must be you (or your own owner); a service token may name anyone",
    )


def _root_for_unscoped(caller: Caller) -> list[Workspace]:
    """Approvals for unscoped mints live on the first root workspace (its owners decide)."""
    root = db.session.execute(
        select(Workspace).where(Workspace.parent_id.is_(None)).order_by(Workspace.id).limit(1)
    ).scalar_one_or_none()
    if root is None:
        raise ApiError(409, "conflict", "create a root workspace before minting unscoped tokens")
    return [root]


@bp.post("/tokens")
@gate_destructive("token.mint", describe=describe_token_mint)
def mint_token():
    """Mint a token; the plaintext is in the response once and never again."""
    body = parse_body(TokenCreate)
    token, plaintext = issue_token(
        body.kind, body.name, user=g.token_user, workspace_id=body.workspace_id
    )
    db.session.commit()
    return {**token_json(token), "token": plaintext}, 201


@bp.get("/tokens")
def list_tokens():
    """Tokens the caller may see: prefixes and metadata, never secrets."""
    caller: Caller = g.caller
    query = select(ApiToken).order_by(ApiToken.id)
    if caller.is_human:
        query = query.where(ApiToken.user_id == caller.user_id)
    elif caller.scope_workspace_id is not None:
        query = query.where(ApiToken.workspace_id.in_(subtree_ids(caller.scope_workspace_id)))
    return {"tokens": [token_json(token) for token in db.session.execute(query).scalars()]}


def _load_token(token_id: int) -> ApiToken:
    token = db.session.get(ApiToken, token_id)
    if token is None:
        raise ApiError(404, "not_found", f"token {token_id} not found")
    return token


def describe_token_revoke(token_id: int) -> GateSubject | None:
    caller: Caller = g.caller
    token = _load_token(token_id)
    if caller.is_human and token.user_id == caller.user_id:
        chain: list[Workspace] = []  # revoking one's own token needs no one's consent
    elif token.workspace_id is not None:
        chain = require_workspace(caller, token.workspace_id, Access.MANAGE)
    else:
        _scope_chain(caller, None)
        chain = _root_for_unscoped(caller)
    if token.revoked_at is not None:
        raise ApiError(409, "already_revoked", f"token {token_id} is already revoked")
    if not chain:
        return None
    return GateSubject(
        chain=chain,
        target={"token_id": token.id},
        summary_fields={
            "token_kind": token.kind,
            "token_name": token.name,
            "token_prefix": token.prefix,
        },
    )


@bp.delete("/tokens/<id:token_id>")
@gate_destructive("token.revoke", describe=describe_token_revoke)
def revoke_token(token_id: int):
    """Revoke a token: it stops authenticating at once."""
    token = _load_token(token_id)
    token.revoked_at = utcnow()
    db.session.commit()
    return "", 204
