"""Who is looking at the dashboard: the session login, and the websocket's origin check."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import abort, current_app, g, redirect, request, session, url_for

from ..auth import Caller, caller_from_user
from ..extensions import db
from ..models import User
from . import bp

PUBLIC_ENDPOINTS = {"dashboard.login"}
LIVE_ENDPOINT = "dashboard.live"


def current_caller() -> Caller:
    """The logged-in user as a Caller, the identity approvals.decide() and visible_to() take."""
    return g.caller


def login_user(user: User) -> None:
    """Start a fresh session: clearing first means no value planted before login survives."""
    session.clear()
    session["user_id"] = user.id


def safe_next(target: str | None) -> str | None:
    """A redirect target only if it stays on this site (a path, never //host or a scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def origin_allowed(origin: str | None) -> bool:
    """The websocket's Origin must be this host, or one the deployment lists explicitly."""
    if not origin:
        return False
    if origin in current_app.config["COUNTERSIGN_ALLOWED_ORIGINS"]:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


@bp.before_request
def require_login():
    """Load the session's user; pages redirect to the login form, the websocket gets 403."""
    g.user = None
    user_id = session.get("user_id")
    if isinstance(user_id, int):
        g.user = db.session.get(User, user_id)
    if g.user is not None:
        g.caller = caller_from_user(g.user)
    if request.endpoint == LIVE_ENDPOINT:
        # Refused before the handshake: a page on another site must not ride our cookie.
        if g.user is None or not origin_allowed(request.headers.get("Origin")):
            abort(403)
        return None
    if g.user is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.method != "GET":
            abort(401)
        return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
    return None
