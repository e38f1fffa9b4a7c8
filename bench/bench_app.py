"""A benchmark-only blueprint added to the production app (served as `bench.wsgi:app`).

The blueprint gives the gate-overhead benchmark its ungated baseline: the same secret delete
as ``DELETE /api/workspaces/<id>/secrets/<name>``, running the same describe step (auth, tree,
lookup) and the same view body, with no gate decision in between. It is registered only here,
never by the app itself.
"""

from __future__ import annotations

from flask import Blueprint, Flask, g, request

from app import create_app
from app.api import secrets as secret_routes
from app.auth import caller_from_bearer

bp = Blueprint("bench", __name__, url_prefix="/bench")


@bp.before_request
def authenticate() -> None:
    """The same bearer-token authentication as the API blueprint."""
    g.caller = caller_from_bearer(request.headers.get("Authorization"))


@bp.get("/ping")
def ping():
    """Authentication only: the floor every API request pays."""
    return {"caller": g.caller.kind}


@bp.delete("/workspaces/<int:workspace_id>/secrets/<name>")
def delete_secret_ungated(workspace_id: int, name: str):
    """The gated route's describe + view, without the gate: the baseline."""
    secret_routes.describe_secret_delete(workspace_id=workspace_id, name=name)
    view = getattr(secret_routes.delete_secret, "__wrapped__", secret_routes.delete_secret)
    return view(workspace_id=workspace_id, name=name)


def register(app: Flask) -> Flask:
    """Add the benchmark blueprint to an app built by create_app (CSRF-exempt, like the API)."""
    csrf = app.extensions.get("csrf")
    if csrf is not None:
        csrf.exempt(bp)
    app.register_blueprint(bp)
    return app


def make_app(**config) -> Flask:
    return register(create_app(config or None))
