"""Template filters: relative times and labels, rendered on the server (app.js keeps them fresh)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from ..models import utcnow
from . import bp

ACTION_LABELS = {
    "workspace.delete": "Delete workspace",
    "secret.delete": "Delete secret",
    "secret.replace": "Overwrite secret",
    "token.mint": "Mint token",
    "token.revoke": "Revoke token",
    "member.remove": "Remove member",
}


def _span(seconds: float) -> str:
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


@bp.app_template_filter("ago")
def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'5 min ago'; 'just now' under ten seconds."""
    if moment is None:
        return ""
    seconds = ((now or utcnow()) - moment).total_seconds()
    return "just now" if seconds < 10 else f"{_span(seconds)} ago"


@bp.app_template_filter("time_left")
def time_left(moment: datetime | None, now: datetime | None = None) -> str:
    """'23 h 59 min left', or 'expired' once the moment has passed."""
    if moment is None:
        return ""
    seconds = (moment - (now or utcnow())).total_seconds()
    return "expired" if seconds <= 0 else f"{_span(seconds)} left"


@bp.app_template_filter("stamp")
def stamp(moment: datetime | None) -> str:
    """An absolute UTC time a human can quote in an incident report."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


@bp.app_template_filter("action_label")
def action_label(action: str) -> str:
    return ACTION_LABELS.get(action, action)


@bp.app_template_filter("pretty_json")
def pretty_json(document: Any) -> str:
    """The canonical context, keys sorted, indented for reading."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)


@bp.app_template_global("subtree_rows")
def subtree_rows(subtree: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """A flat subtree (each item with id and parent_id) in depth-first order, with depths."""
    ids = {item.get("id") for item in subtree}
    children: dict[Any, list[dict[str, Any]]] = {}
    for item in subtree:
        parent = item.get("parent_id") if item.get("parent_id") in ids else None
        children.setdefault(parent, []).append(item)
    ordered: list[tuple[dict[str, Any], int]] = []
    stack = [(item, 0) for item in reversed(children.get(None, []))]
    while stack:
        item, depth = stack.pop()
        ordered.append((item, depth))
        stack.extend((child, depth + 1) for child in reversed(children.get(item.get("id"), [])))
    return ordered
