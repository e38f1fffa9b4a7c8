"""Who is calling (bearer token or dashboard session), and what they may do where."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import IntEnum

from sqlalchemy import literal, select
from werkzeug.security import check_password_hash, generate_password_hash

from .errors import ApiError
from .extensions import db
from .models import DECIDING_ROLES, ApiToken, Membership, Role, TokenKind, User, Workspace


class Access(IntEnum):
    """What a caller may do on a workspace, ordered so a higher level includes the lower."""

    NONE = 0
    READ = 1
    DECIDE = 2  # read, and approve or deny requests
    MANAGE = 3  # everything: create, change, delete


ROLE_ACCESS = {
    Role.OWNER.value: Access.MANAGE,
    Role.APPROVER.value: Access.DECIDE,
    Role.VIEWER.value: Access.READ,
}


@dataclass(frozen=True)
class Caller:
    """The authenticated identity of one request."""

    kind: str  # agent | user | service
    name: str
    token_id: int | None = None
    user_id: int | None = None
    scope_workspace_id: int | None = None  # agent/service tokens issued for one subtree
    # The human who owns an agent token (its ``user``): the policy may bar them from approving
    # that agent's requests. Never grants anything: ``user_id`` stays None for agents.
    owner_id: int | None = None

    @property
    def is_human(self) -> bool:
        return self.kind == TokenKind.USER.value and self.user_id is not None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


# ---- secrets at rest ---------------------------------------------------------------------------


def hash_token(plaintext: str) -> str:
    """Tokens carry 256 random bits, so a fast hash is enough and keeps lookup indexable."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_token_plaintext(kind: str) -> str:
    return f"cs_{kind}_{secrets.token_urlsafe(32)}"


def hash_password(password: str) -> str:
    return generate_password_hash(password)


def password_matches(user: User | None, password: str) -> bool:
    if user is None:
        # Spend the same effort on unknown names so timing does not reveal which exist.
        check_password_hash(_DUMMY_HASH, password)
        return False
    return check_password_hash(user.password_hash, password)


_DUMMY_HASH = generate_password_hash(secrets.token_hex(8))


def issue_token(
    kind: str, name: str, *, user: User | None = None, workspace_id: int | None = None
) -> tuple[ApiToken, str]:
    """Create a token row (not committed) and return it with its plaintext, shown once."""
    plaintext = new_token_plaintext(kind)
    token = ApiToken(
        kind=kind,
        name=name,
        prefix=plaintext[: len(f"cs_{kind}_") + 6],
        token_hash=hash_token(plaintext),
        user_id=user.id if user else None,
        workspace_id=workspace_id,
    )
    db.session.add(token)
    return token, plaintext


def caller_from_bearer(header: str | None) -> Caller:
    """Resolve an Authorization header to a caller, or raise 401."""
    if not header or not header.startswith("Bearer "):
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>")
    plaintext = header[len("Bearer ") :].strip()
    if not plaintext or len(plaintext) > 200:
        raise ApiError(401, "unauthorized", "invalid token")
    # Lookup by the hash of the presented token: the comparison happens on digests inside an
    # index, so response time does not depend on how much of a real token was guessed.
    token = db.session.execute(
        select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext))
    ).scalar_one_or_none()
    if token is None or token.revoked_at is not None:
        raise ApiError(401, "unauthorized", "invalid or revoked token")
    if token.kind == TokenKind.USER.value:
        return Caller(
            kind=token.kind,
            name=token.user.username if token.user else token.name,
            token_id=token.id,
            user_id=token.user_id,
        )
    return Caller(
        kind=token.kind,
        name=token.name,
        token_id=token.id,
        scope_workspace_id=token.workspace_id,
        owner_id=token.user_id,
    )


def caller_from_user(user: User) -> Caller:
    return Caller(kind=TokenKind.USER.value, name=user.username, user_id=user.id)


# ---- the tree ----------------------------------------------------------------------------------


def ancestor_chain(workspace_id: int) -> list[Workspace]:
    """The workspace and its ancestors, nearest first; empty if it does not exist."""
    chain = (
        select(Workspace.id, Workspace.parent_id, literal(0).label("depth"))
        .where(Workspace.id == workspace_id)
        .cte("chain", recursive=True)
    )
    parent = select(Workspace.id, Workspace.parent_id, (chain.c.depth + 1).label("depth")).join(
        chain, Workspace.id == chain.c.parent_id
    )
    chain = chain.union_all(parent)
    rows = db.session.execute(
        select(Workspace).join(chain, Workspace.id == chain.c.id).order_by(chain.c.depth)
    ).scalars()
    return list(rows)


def subtree_ids(workspace_id: int) -> list[int]:
    """The workspace and all its descendants."""
    tree = select(Workspace.id).where(Workspace.id == workspace_id).cte("tree", recursive=True)
    tree = tree.union_all(select(Workspace.id).join(tree, Workspace.parent_id == tree.c.id))
    return list(db.session.execute(select(tree.c.id)).scalars())


def path_label(chain: list[Workspace]) -> str:
    """Root-first 'acme / prod / api' label for a nearest-first chain."""
    return " / ".join(ws.name for ws in reversed(chain))


# ---- rights ------------------------------------------------------------------------------------


def access_on_chain(caller: Caller, chain: list[Workspace]) -> Access:
    """What the caller may do on chain[0], given its nearest-first ancestor chain."""
    if not chain:
        return Access.NONE
    if caller.kind in (TokenKind.AGENT.value, TokenKind.SERVICE.value):
        in_scope = caller.scope_workspace_id is None or any(
            ws.id == caller.scope_workspace_id for ws in chain
        )
        # Tokens never decide approvals; that is for humans only.
        return Access.MANAGE if in_scope else Access.NONE
    if caller.user_id is None:
        return Access.NONE
    roles = db.session.execute(
        select(Membership.role).where(
            Membership.user_id == caller.user_id,
            Membership.workspace_id.in_([ws.id for ws in chain]),
        )
    ).scalars()
    return max((ROLE_ACCESS[role] for role in roles), default=Access.NONE)


def require_workspace(caller: Caller, workspace_id: int, need: Access) -> list[Workspace]:
    """Return the nearest-first chain of a workspace the caller may act on, else 404/403."""
    chain = ancestor_chain(workspace_id)
    if not chain:
        raise ApiError(404, "not_found", f"workspace {workspace_id} not found")
    if access_on_chain(caller, chain) < need:
        raise ApiError(403, "forbidden", f"this needs {need.name.lower()} rights on the workspace")
    return chain


def global_access(caller: Caller) -> Access:
    """Rights outside any workspace (root workspaces, unscoped tokens)."""
    if (
        caller.kind in (TokenKind.AGENT.value, TokenKind.SERVICE.value)
        and caller.scope_workspace_id is None
    ):
        return Access.MANAGE
    return Access.NONE


def deciding_levels(user_id: int, scope_levels: dict[int, int]) -> list[int]:
    """Levels (0 = the workspace itself) at which the user holds an owner/approver role."""
    rows = db.session.execute(
        select(Membership.workspace_id).where(
            Membership.user_id == user_id,
            Membership.workspace_id.in_(list(scope_levels)),
            Membership.role.in_(DECIDING_ROLES),
        )
    ).scalars()
    return sorted(scope_levels[ws_id] for ws_id in rows)
