"""Dashboard pages, login/logout, and the decision POST (through approvals.decide, like the API)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import (
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy import func, not_, select

from .. import approvals
from ..auth import Caller, password_matches, subtree_ids
from ..errors import ApiError
from ..extensions import db
from ..models import (
    DECIDING_ROLES,
    ApprovalRequest,
    ApprovalScope,
    ApprovalStatus,
    Membership,
    User,
    Workspace,
    utcnow,
)
from ..policy import POLICY
from . import bp
from .access import current_caller, login_user, safe_next
from .rows import decidable_pending_count, entries_of, pending_entries

HISTORY_STATUSES = [
    s.value for s in ApprovalStatus if s.value != approvals.PENDING
]  # approved, denied, expired, consumed, withdrawn
PAGE_SIZE = 25
REASON_MAX = 2000


def render_page(
    template: str, *, live: str = "other", approval_id: int | None = None, **context: Any
) -> str:
    """A full page: the title count and the websocket address come with every one."""
    now = context.setdefault("now", utcnow())
    return render_template(
        template,
        pending_count=decidable_pending_count(current_caller(), now),
        live_url=url_for("dashboard.live", view=live, approval=approval_id),
        **context,
    )


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


# ---- login ---------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Password login; the session is cleared first so no pre-login value survives."""
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET" and g.user is not None:
        return redirect(next_url or url_for("dashboard.pending"))
    error = None
    username = ""
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        user = None
        if 0 < len(username) <= 64:
            user = db.session.execute(
                select(User).where(User.username == username)
            ).scalar_one_or_none()
        if password_matches(user, password):
            login_user(user)
            return redirect(next_url or url_for("dashboard.pending"), code=303)
        error = "Unknown user or wrong password."
    status = 401 if error else 200
    return render_template(
        "dashboard/login.html", error=error, username=username, next_url=next_url
    ), status


@bp.record_once
def throttle_failed_logins(state) -> None:
    """Failed logins (401) count against COUNTERSIGN_LOGIN_LIMIT per client address, when the
    app has a limiter (security.py); a password guesser slows down, a user who logs in doesn't."""
    limiter = state.app.extensions.get("countersign_limiter")
    if limiter is None:
        return
    config = state.app.config
    endpoint = f"{bp.name}.login"
    state.app.view_functions[endpoint] = limiter.limit(
        lambda: config.get("COUNTERSIGN_LOGIN_LIMIT", "10/minute"),
        deduct_when=lambda response: response.status_code == 401,
        methods=["POST"],
        scope="dashboard-login",
    )(state.app.view_functions[endpoint])


@bp.post("/logout")
def logout():
    """End the session (a POST with the CSRF token: a link elsewhere cannot log you out)."""
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for("dashboard.login"), code=303)


# ---- pending -------------------------------------------------------------------------------


@bp.get("/")
def pending():
    """Requests awaiting a decision that the user may see, newest first."""
    now = utcnow()
    entries = pending_entries(current_caller(), now)
    return render_page("dashboard/pending.html", live="pending", entries=entries, now=now)


# ---- detail --------------------------------------------------------------------------------


def visible_request(approval_id: int) -> ApprovalRequest:
    """The request if this user may see it; 404 otherwise (existence is not disclosed)."""
    found = db.session.execute(
        select(ApprovalRequest).where(
            ApprovalRequest.id == approval_id, approvals.visible_to(current_caller())
        )
    ).scalar_one_or_none()
    if found is None:
        abort(404)
    return found


def detail_context(
    found: ApprovalRequest, now: datetime, caller: Caller | None = None
) -> dict[str, Any]:
    """What the detail panel shows: the request, the user's right on it, the timeline."""
    entry = entries_of(caller or current_caller(), [found], now)[0]
    return {
        "request_row": found,
        "entry": entry,
        "row": entry.row,
        "timeline": approvals.events_of(found.id),
        "now": now,
    }


@bp.get("/approvals/<id:approval_id>")
def detail(approval_id: int):
    """Everything known about one request: context, hash, decision, event timeline."""
    now = utcnow()
    found = visible_request(approval_id)
    return render_page(
        "dashboard/detail.html",
        live="detail",
        approval_id=approval_id,
        **detail_context(found, now),
    )


# ---- deciding ------------------------------------------------------------------------------


@bp.post("/approvals/<id:approval_id>/decision")
def decide(approval_id: int):
    """Approve or deny through approvals.decide(), the same rules as the API endpoint."""
    decision = request.form.get("decision")
    reason = (request.form.get("reason") or "").strip() or None
    if decision not in ("approve", "deny"):
        return decision_problem(approval_id, 422, "Choose approve or deny.")
    if decision == "deny" and not reason:
        return decision_problem(approval_id, 422, "A denial needs a reason for the agent.")
    if reason and len(reason) > REASON_MAX:
        return decision_problem(approval_id, 422, f"Keep the reason under {REASON_MAX} characters.")
    try:
        decided = approvals.decide(approval_id, current_caller(), decision, reason)
        db.session.commit()
    except ApiError as error:
        db.session.rollback()
        return decision_problem(approval_id, error.status, problem_message(approval_id, error))
    if decided.status == approvals.PENDING:  # one vote of several
        message = f"Your approval of request #{approval_id} is counted; it needs more approvals."
    else:
        verb = "Approved" if decision == "approve" else "Denied"
        message = f"{verb} request #{approval_id}: {decided.summary}"
    if not is_htmx():
        flash(message, "success")
        return redirect(safe_next(request.form.get("next")) or url_for("dashboard.pending"), 303)
    return decision_fragment(approval_id, message, "success"), 200


def problem_message(approval_id: int, error: ApiError) -> str:
    """What the page says when approvals.decide() refuses, by the API's error code."""
    if error.code == "not_pending":
        status = error.extra.get("status", "decided")
        return f"Request #{approval_id} is no longer pending: it is {status}. Nothing was changed."
    if error.code == "already_voted":
        return f"You already approved request #{approval_id}; it needs another person's approval."
    if error.code == "requester_owner":
        return f"You own the token that asked for #{approval_id}: someone else must approve it."
    if error.status == 403:
        return f"You have no right to decide request #{approval_id}. Nothing was changed."
    if error.status == 404:
        return f"Request #{approval_id} does not exist."
    if error.code == "validation_error" and error.extra.get("field") == "reason":
        return "The policy needs a reason for this decision. Nothing was changed."
    return error.message


def decision_problem(approval_id: int, status: int, message: str):
    """A refused decision: a clear message in the page (htmx) or an error page, same status."""
    if not is_htmx():
        return render_template(
            "error.html", error=None, message=message, back=safe_next(request.form.get("next"))
        ), status
    return decision_fragment(approval_id, message, "error"), status


def decision_fragment(approval_id: int, message: str, kind: str) -> str:
    """OOB parts after a decision attempt: the notice, the row or panel, and the count."""
    now = utcnow()
    caller = current_caller()
    found = db.session.execute(
        select(ApprovalRequest).where(
            ApprovalRequest.id == approval_id, approvals.visible_to(caller)
        )
    ).scalar_one_or_none()
    context: dict[str, Any] = {"message": message, "kind": kind, "now": now}
    if found is not None:
        if request.form.get("from") == "detail":
            context["detail"] = detail_context(found, now)
        else:
            context["entry"] = entries_of(caller, [found], now)[0]
    context["count"] = decidable_pending_count(caller, now)
    return render_template("dashboard/_decision_result.html", **context)


# ---- history -------------------------------------------------------------------------------


@dataclass
class HistoryFilters:
    workspace_id: int | None = None
    action: str | None = None
    status: str | None = None
    page: int = 1

    @classmethod
    def from_args(cls, args) -> HistoryFilters:
        workspace_id = args.get("workspace", type=int)
        action = args.get("action") or None
        status = args.get("status") or None
        page = args.get("page", 1, type=int)
        return cls(
            workspace_id if workspace_id and 0 < workspace_id < 2**31 else None,
            action if action in POLICY else None,
            status if status in HISTORY_STATUSES else None,
            max(1, min(page or 1, 100_000)),
        )

    def args(self, **changes: Any) -> dict[str, Any]:
        """Query arguments for a link that keeps these filters (e.g. to another page)."""
        values = {
            "workspace": self.workspace_id,
            "action": self.action,
            "status": self.status,
            "page": self.page,
        }
        values.update(changes)
        if values["page"] == 1:
            del values["page"]
        return {key: value for key, value in values.items() if value}


@bp.get("/history")
def history():
    """Requests no longer pending, filterable by workspace, action and status, paged."""
    now = utcnow()
    caller = current_caller()
    filters = HistoryFilters.from_args(request.args)
    query = select(ApprovalRequest).where(
        approvals.visible_to(caller), not_(approvals.status_filter(approvals.PENDING, now))
    )
    if filters.workspace_id:
        query = query.where(
            ApprovalRequest.id.in_(
                select(ApprovalScope.approval_id).where(
                    ApprovalScope.workspace_id == filters.workspace_id
                )
            )
        )
    if filters.action:
        query = query.where(ApprovalRequest.action == filters.action)
    if filters.status:
        query = query.where(approvals.status_filter(filters.status, now))
    total = db.session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    pages = max(1, -(-total // PAGE_SIZE))
    filters.page = min(filters.page, pages)
    requests = list(
        db.session.execute(
            query.order_by(ApprovalRequest.created_at.desc(), ApprovalRequest.id.desc())
            .offset((filters.page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE)
        ).scalars()
    )
    return render_page(
        "dashboard/history.html",
        entries=entries_of(caller, requests, now),
        filters=filters,
        total=total,
        pages=pages,
        workspaces=[(node.id, node.path) for node in visible_tree(caller.user_id, now).flat],
        actions=sorted(POLICY),
        statuses=HISTORY_STATUSES,
        now=now,
    )


# ---- workspaces ----------------------------------------------------------------------------


@dataclass
class Node:
    id: int
    name: str
    path: str
    role: str | None  # the user's own role here, if any
    members: list[tuple[str, str]] = field(default_factory=list)  # (username, role)
    inherited: list[tuple[str, str, str]] = field(default_factory=list)  # (user, role, from)
    pending: int = 0
    children: list[Node] = field(default_factory=list)


@dataclass
class Tree:
    roots: list[Node]
    flat: list[Node]  # depth-first order, for select boxes


def visible_tree(user_id: int, now: datetime) -> Tree:
    """The workspaces the user holds a role on, and everything below them."""
    own_roles = dict(
        db.session.execute(
            select(Membership.workspace_id, Membership.role).where(Membership.user_id == user_id)
        ).all()
    )
    ids: set[int] = set()
    for workspace_id in own_roles:
        if workspace_id not in ids:
            ids.update(subtree_ids(workspace_id))
    workspaces = list(
        db.session.execute(
            select(Workspace).where(Workspace.id.in_(ids)).order_by(Workspace.name, Workspace.id)
        ).scalars()
    )
    members: dict[int, list[tuple[str, str]]] = {}
    for workspace_id, username, role in db.session.execute(
        select(Membership.workspace_id, User.username, Membership.role)
        .join(User, User.id == Membership.user_id)
        .where(Membership.workspace_id.in_(ids))
        .order_by(User.username)
    ):
        members.setdefault(workspace_id, []).append((username, role))
    pending_by_ws = dict(
        db.session.execute(
            select(ApprovalRequest.workspace_id, func.count(ApprovalRequest.id))
            .where(
                ApprovalRequest.workspace_id.in_(ids),
                approvals.status_filter(approvals.PENDING, now),
            )
            .group_by(ApprovalRequest.workspace_id)
        ).all()
    )
    nodes = {
        ws.id: Node(
            ws.id,
            ws.name,
            ws.name,
            own_roles.get(ws.id),
            members.get(ws.id, []),
            pending=pending_by_ws.get(ws.id, 0),
        )
        for ws in workspaces
    }
    roots: list[Node] = []
    for ws in workspaces:
        parent = nodes.get(ws.parent_id) if ws.parent_id else None
        (parent.children if parent else roots).append(nodes[ws.id])
    flat: list[Node] = []

    def walk(node: Node, path: str, inherited: list[tuple[str, str, str]]) -> None:
        node.path = path
        node.inherited = inherited
        flat.append(node)
        deciders = [(u, r, node.name) for u, r in node.members if r in DECIDING_ROLES]
        for child in node.children:
            walk(child, f"{path} / {child.name}", inherited + deciders)

    for root in roots:
        walk(root, root.name, [])
    return Tree(roots, flat)


@bp.get("/workspaces")
def workspaces():
    """The workspace tree the user can see, its approvers, and pending counts."""
    now = utcnow()
    return render_page("dashboard/workspaces.html", tree=visible_tree(g.user.id, now), now=now)
