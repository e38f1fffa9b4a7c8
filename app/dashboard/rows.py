"""What one user sees of approval requests: plain snapshots plus that user's right to decide.

Pages and the live feed share these, so a row rendered over HTTP and one pushed over the
websocket come from the same data and the same template.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from .. import approvals
from ..auth import Caller
from ..extensions import db
from ..models import (
    DECIDING_ROLES,
    ApprovalRequest,
    ApprovalScope,
    ApprovalVote,
    Membership,
    VoteDecision,
)


@dataclass(frozen=True)
class Snapshot:
    """An approval request as plain values, safe to share between threads and sessions."""

    id: int
    workspace_id: int
    action: str
    summary: str
    workspace_path: tuple[dict[str, Any], ...]
    requested_by_kind: str
    requested_by_name: str
    status: str  # the effective status when the snapshot was taken
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by_name: str | None
    decided_level: int | None
    reason: str | None
    scopes: tuple[tuple[int, int], ...]  # (workspace_id, level): whose approvers may decide
    approvals_required: int = 1  # distinct humans who must approve (the request's policy)
    approvers: tuple[tuple[int | None, str], ...] = ()  # (user id, name) of approvals so far
    approve_needs_reason: bool = False  # the policy wants a reason with an approval too
    # user id -> ((workspace_id, role), ...) for every role held on a scope workspace, read
    # with the row: who may see and decide it at that moment. Empty unless snapshot() loaded it.
    roles: Mapping[int, tuple[tuple[int, str], ...]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        request: ApprovalRequest,
        scopes: dict[int, int],
        now: datetime,
        roles: Mapping[int, tuple[tuple[int, str], ...]] | None = None,
        approvers: tuple[tuple[int | None, str], ...] = (),
    ) -> Snapshot:
        return cls(
            id=request.id,
            workspace_id=request.workspace_id,
            action=request.action,
            summary=request.summary,
            workspace_path=tuple(request.workspace_path or ()),
            requested_by_kind=request.requested_by_kind,
            requested_by_name=request.requested_by_name,
            status=approvals.effective_status(request, now),
            created_at=request.created_at,
            expires_at=request.expires_at,
            decided_at=request.decided_at,
            decided_by_name=request.decided_by_name,
            decided_level=request.decided_level,
            reason=request.reason,
            scopes=tuple(sorted(scopes.items())),
            approvals_required=request.approvals_required or 1,
            approvers=approvers,
            approve_needs_reason=approvals.terms_of(request).needs_reason("approve"),
            roles=roles or {},
        )

    @property
    def is_pending(self) -> bool:
        return self.status == approvals.PENDING

    @property
    def needs_more_approvals(self) -> bool:
        return self.approvals_required > 1

    def approved_by(self, user_id: int | None) -> bool:
        return any(voter == user_id for voter, _ in self.approvers)

    def ancestor_name(self, level: int) -> str | None:
        """The name of the workspace ``level`` steps above the request's (path is root-first)."""
        if 0 <= level < len(self.workspace_path):
            return self.workspace_path[-1 - level].get("name")
        return None


@dataclass(frozen=True)
class Entry:
    """A snapshot as one user sees it."""

    row: Snapshot
    # The nearest level at which the user may decide (0: on the workspace itself, >0: on an
    # ancestor, i.e. by escalation); None when the user may only look.
    level: int | None
    user_id: int | None = None

    @property
    def can_decide(self) -> bool:
        return self.level is not None and self.row.is_pending

    @property
    def can_approve(self) -> bool:
        """Deciding, and not one of the approvals already counted (each person counts once)."""
        return self.can_decide and not self.row.approved_by(self.user_id)

    @property
    def escalated_from(self) -> str | None:
        """The ancestor the user's right comes from, when it does not come from the workspace."""
        if self.level is None or self.level == 0:
            return None
        return self.row.ancestor_name(self.level)


def entry_for(caller: Caller, row: Snapshot) -> Entry | None:
    """The user's view of a request, or None when they may not see it at all.

    The rule of approvals.visible_to(): a role on any workspace in the request's scope (its
    own workspace or an ancestor). Deciding needs owner/approver there, as in decide(). The
    roles come with the snapshot, read after the change committed.
    """
    levels = dict(row.scopes)
    roles = row.roles.get(caller.user_id, ()) if caller.user_id is not None else ()
    if not roles:
        return None
    deciding = [levels[ws] for ws, role in roles if role in DECIDING_ROLES and ws in levels]
    return Entry(row, min(deciding) if deciding else None, caller.user_id)


def approvers_of(approval_ids: list[int]) -> dict[int, tuple[tuple[int | None, str], ...]]:
    """approval id -> (user id, name) of each approval vote, oldest first, in one query."""
    found: dict[int, list[tuple[int | None, str]]] = {
        approval_id: [] for approval_id in approval_ids
    }
    if approval_ids:
        rows = db.session.execute(
            select(ApprovalVote.approval_id, ApprovalVote.user_id, ApprovalVote.username)
            .where(
                ApprovalVote.approval_id.in_(approval_ids),
                ApprovalVote.decision == VoteDecision.APPROVE.value,
            )
            .order_by(ApprovalVote.id)
        )
        for approval_id, user_id, username in rows:
            found[approval_id].append((user_id, username))
    return {approval_id: tuple(votes) for approval_id, votes in found.items()}


def scopes_of(approval_ids: list[int]) -> dict[int, dict[int, int]]:
    """approval id -> {workspace id: level} for many requests in one query."""
    found: dict[int, dict[int, int]] = {approval_id: {} for approval_id in approval_ids}
    if not approval_ids:
        return found
    rows = db.session.execute(
        select(ApprovalScope.approval_id, ApprovalScope.workspace_id, ApprovalScope.level).where(
            ApprovalScope.approval_id.in_(approval_ids)
        )
    )
    for approval_id, workspace_id, level in rows:
        found[approval_id][workspace_id] = level
    return found


def snapshot(approval_id: int, now: datetime) -> Snapshot | None:
    """Load one request with its scope and the roles held on it (None if it does not exist)."""
    request = db.session.get(ApprovalRequest, approval_id)
    if request is None:
        return None
    scopes = approvals.scope_levels(approval_id)
    roles: dict[int, list[tuple[int, str]]] = {}
    for user_id, workspace_id, role in db.session.execute(
        select(Membership.user_id, Membership.workspace_id, Membership.role).where(
            Membership.workspace_id.in_(list(scopes))
        )
    ):
        roles.setdefault(user_id, []).append((workspace_id, role))
    return Snapshot.of(
        request,
        scopes,
        now,
        {user_id: tuple(held) for user_id, held in roles.items()},
        approvers_of([approval_id])[approval_id],
    )


def pending_entries(caller: Caller, now: datetime) -> list[Entry]:
    """Every pending request the user may see, newest first, with their right on each."""
    requests = list(
        db.session.execute(
            select(ApprovalRequest)
            .where(approvals.visible_to(caller), approvals.status_filter(approvals.PENDING, now))
            .order_by(ApprovalRequest.created_at.desc(), ApprovalRequest.id.desc())
        ).scalars()
    )
    return entries_of(caller, requests, now)


def entries_of(caller: Caller, requests: list[ApprovalRequest], now: datetime) -> list[Entry]:
    """Requests the caller may see (already filtered by visible_to) as entries, in order."""
    scopes = scopes_of([r.id for r in requests])
    approvers = approvers_of([r.id for r in requests])
    deciding_on = set(
        db.session.execute(
            select(Membership.workspace_id).where(
                Membership.user_id == caller.user_id, Membership.role.in_(DECIDING_ROLES)
            )
        ).scalars()
    )
    entries = []
    for request in requests:
        levels = scopes[request.id]
        deciding = [level for ws, level in levels.items() if ws in deciding_on]
        row = Snapshot.of(request, levels, now, approvers=approvers[request.id])
        entries.append(Entry(row, min(deciding) if deciding else None, caller.user_id))
    return entries


def decidable_pending_count(caller: Caller, now: datetime) -> int:
    """How many pending requests await this user's decision (the number in the title)."""
    deciding_on = select(Membership.workspace_id).where(
        Membership.user_id == caller.user_id, Membership.role.in_(DECIDING_ROLES)
    )
    return db.session.execute(
        select(func.count(ApprovalRequest.id)).where(
            approvals.status_filter(approvals.PENDING, now),
            ApprovalRequest.id.in_(
                select(ApprovalScope.approval_id).where(ApprovalScope.workspace_id.in_(deciding_on))
            ),
        )
    ).scalar_one()
