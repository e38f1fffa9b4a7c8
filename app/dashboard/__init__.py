"""The approval dashboard blueprint: server-rendered pages, htmx fragments, the websocket."""

from flask import Blueprint

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def pending():
    """Placeholder until the dashboard lands."""
    return "Countersign"
