"""A tool description (JSON) for MCP servers and agent frameworks, generated from the policy map.

It tells a model what a 202 means, so it asks its human and waits instead of retrying blindly.
"""

from __future__ import annotations

from typing import Any

from .policy import POLICY, format_duration


def gated_routes() -> dict[str, list[str]]:
    """Policy action -> the routes it gates, from the OpenAPI operation table."""
    from .openapi import OPERATIONS

    routes: dict[str, list[str]] = {}
    for op in OPERATIONS:
        if op.gate:
            routes.setdefault(op.gate, []).append(f"{op.method.upper()} {op.path}")
    return routes


def tool_description() -> dict[str, Any]:
    routes = gated_routes()
    gated = [
        f"- {p.action}: {', '.join(routes.get(p.action, []))}; once granted, an approval is "
        f"usable for {format_duration(p.approval_ttl)}; a request waits up to "
        f"{format_duration(p.pending_ttl)}"
        for p in POLICY.values()
    ]
    description = "\n".join(
        [
            "Call the Countersign workspace API (workspaces, secrets, tokens, members).",
            "Destructive operations need a human countersignature. When a call answers HTTP 202,",
            "nothing has happened yet: a human must approve. Then:",
            "1. Tell the user what you asked for (the `summary`) and that it awaits approval.",
            "2. Wait: GET the `status_url` with ?wait=60 (repeat while status is pending).",
            "3. When status is approved, re-send the IDENTICAL request once (same method, path,",
            "   body): it runs and answers 2xx. Any change to it needs a new approval.",
            "4. If status is denied (or a retry answers 403 approval_denied), stop and report the",
            "   human's `reason`; do not ask again with a reworded request.",
            "Never try to approve your own request; agent tokens cannot.",
            "Gated actions:",
            *gated,
        ]
    )
    return {
        "name": "countersign_api",
        "description": description,
        "inputSchema": {
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": ["GET", "POST", "PUT", "DELETE"]},
                "path": {
                    "type": "string",
                    "pattern": "^/api/",
                    "description": "e.g. /api/workspaces/7",
                },
                "body": {"type": "object", "description": "JSON body for POST/PUT"},
            },
            "required": ["method", "path"],
            "additionalProperties": False,
        },
        "annotations": {"destructiveHint": True, "idempotentHint": False},
        "x-countersign-gated-actions": sorted(POLICY),
    }
