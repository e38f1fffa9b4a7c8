"""Every route x every kind of caller, with the expected status, from one table.

A route that is registered but missing from ROUTES fails test_every_route_is_in_the_matrix, so
a new route cannot ship without an authorization rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from app.auth import hash_password
from app.extensions import db
from app.models import ApiToken, Membership, User, utcnow

CALLERS = [
    "none",
    "bad_token",
    "revoked",
    "agent_in_scope",
    "agent_out_of_scope",
    "viewer",
    "approver_of_parent",
    "approver_of_sibling",
    "service",
]
UNAUTHENTICATED = {"none": 401, "bad_token": 401, "revoked": 401}


@dataclass(frozen=True)
class Route:
    method: str
    rule: str  # as registered in url_map
    path: str  # with {placeholders} filled from the fixture ids
    expect: dict[str, int]
    body: dict[str, Any] | None = None


def everyone(status: int, **overrides: int) -> dict[str, int]:
    return {**UNAUTHENTICATED, **{c: status for c in CALLERS[3:]}, **overrides}


READ_API_WS = everyone(200, agent_out_of_scope=403, approver_of_sibling=403)
MANAGE_API_WS = everyone(403, agent_in_scope=200, service=200)
GATED_API_WS = everyone(403, agent_in_scope=202, service=204)

ROUTES = [
    Route("GET", "/api/workspaces", "/api/workspaces", everyone(200)),
    Route(
        "POST",
        "/api/workspaces",
        "/api/workspaces",
        {**MANAGE_API_WS, "agent_in_scope": 201, "service": 201},
        {"name": "child", "parent_id": "{api}"},
    ),
    Route("GET", "/api/workspaces/<id:workspace_id>", "/api/workspaces/{api}", READ_API_WS),
    Route("DELETE", "/api/workspaces/<id:workspace_id>", "/api/workspaces/{api}", GATED_API_WS),
    Route(
        "GET",
        "/api/workspaces/<id:workspace_id>/secrets",
        "/api/workspaces/{api}/secrets",
        READ_API_WS,
    ),
    Route(
        "PUT",
        "/api/workspaces/<id:workspace_id>/secrets/<name>",
        "/api/workspaces/{api}/secrets/DB_PASSWORD",
        {**GATED_API_WS, "service": 200},
        {"value": "rotated"},
    ),
    Route(
        "DELETE",
        "/api/workspaces/<id:workspace_id>/secrets/<name>",
        "/api/workspaces/{api}/secrets/DB_PASSWORD",
        GATED_API_WS,
    ),
    Route(
        "GET",
        "/api/workspaces/<id:workspace_id>/members",
        "/api/workspaces/{api}/members",
        READ_API_WS,
    ),
    Route(
        "PUT",
        "/api/workspaces/<id:workspace_id>/members/<username>",
        "/api/workspaces/{api}/members/victor",
        MANAGE_API_WS,
        {"role": "viewer"},
    ),
    Route(
        "DELETE",
        "/api/workspaces/<id:workspace_id>/members/<username>",
        "/api/workspaces/{api}/members/victor",
        GATED_API_WS,
    ),
    Route("GET", "/api/tokens", "/api/tokens", everyone(200)),
    Route(
        "POST",
        "/api/tokens",
        "/api/tokens",
        {**MANAGE_API_WS, "agent_in_scope": 201, "service": 201},
        {"kind": "agent", "name": "helper", "workspace_id": "{api}"},
    ),
    Route("DELETE", "/api/tokens/<id:token_id>", "/api/tokens/{agent_y_token}", GATED_API_WS),
    Route("GET", "/api/approvals", "/api/approvals", everyone(200)),
    Route(
        "GET",
        "/api/approvals/<id:approval_id>",
        "/api/approvals/{approval}",
        everyone(200, agent_out_of_scope=404, approver_of_sibling=404),
    ),
    Route(
        "POST",
        "/api/approvals/<id:approval_id>/decision",
        "/api/approvals/{approval}/decision",
        everyone(403, approver_of_parent=200),
        {"decision": "approve", "reason": "looks right"},
    ),
    Route(
        "POST",
        "/api/approvals/<id:approval_id>/withdraw",
        "/api/approvals/{approval}/withdraw",
        everyone(403, agent_in_scope=200),
    ),
    # Webhooks: owners and service tokens only, never an agent (it must not silence its own
    # notifications). Webhook 999999 does not exist: the service gets past authorization to 404.
    Route(
        "POST",
        "/api/workspaces/<id:workspace_id>/webhooks",
        "/api/workspaces/{api}/webhooks",
        everyone(403, service=201),
        {"url": "https://hooks.example.com/cs", "events": ["created"]},
    ),
    Route(
        "GET",
        "/api/workspaces/<id:workspace_id>/webhooks",
        "/api/workspaces/{api}/webhooks",
        everyone(403, service=200),
    ),
    Route(
        "DELETE",
        "/api/workspaces/<id:workspace_id>/webhooks/<id:webhook_id>",
        "/api/workspaces/{api}/webhooks/999999",
        everyone(403, service=404),
    ),
    Route(
        "GET",
        "/api/workspaces/<id:workspace_id>/webhooks/<id:webhook_id>/deliveries",
        "/api/workspaces/{api}/webhooks/999999/deliveries",
        everyone(403, service=404),
    ),
    Route("GET", "/api/openapi.json", "/api/openapi.json", {c: 200 for c in CALLERS}),
    Route("GET", "/api/docs", "/api/docs", {c: 200 for c in CALLERS}),
    Route("GET", "/metrics", "/metrics", everyone(403, service=200)),
]


def test_every_route_is_in_the_matrix(app):
    covered = {(route.method, route.rule) for route in ROUTES}
    registered = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api") or rule.rule == "/metrics"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert registered - covered == set(), "routes without an authorization rule"
    assert covered - registered == set(), "matrix entries for routes that do not exist"
    for route in ROUTES:
        assert set(route.expect) == set(CALLERS), route


@pytest.fixture
def callers(app, client, world) -> dict[str, dict[str, str]]:
    """Headers for each kind of caller, and a pending approval requested by the agent."""
    with app.app_context():
        pat = User(username="pat", password_hash=hash_password(world.password))
        db.session.add(pat)
        db.session.flush()
        db.session.add(Membership(workspace_id=world.ws["prod"], user_id=pat.id, role="approver"))
        db.session.get(ApiToken, world.token_ids["mallory"]).revoked_at = utcnow()
        db.session.commit()
    from app.auth import issue_token

    with app.app_context():
        pat = db.session.execute(db.select(User).where(User.username == "pat")).scalar_one()
        _, pat_token = issue_token("user", "pat", user=pat)
        db.session.commit()
    return {
        "none": {},
        "bad_token": {"Authorization": "Bearer cs_agent_not-a-real-token"},
        "revoked": world.auth("mallory"),
        "agent_in_scope": world.auth("agent"),
        "agent_out_of_scope": world.auth("agent_staging"),
        "viewer": world.auth("victor"),
        "approver_of_parent": {"Authorization": f"Bearer {pat_token}"},
        "approver_of_sibling": world.auth("dave"),
        "service": world.auth("service"),
    }


def fill(template: Any, ids: dict[str, int]) -> Any:
    if isinstance(template, str):
        whole = re.fullmatch(r"\{(\w+)\}", template)
        if whole:
            return ids[whole.group(1)]
        return template.format(**ids)
    if isinstance(template, dict):
        return {key: fill(value, ids) for key, value in template.items()}
    return template


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.rule}")
def test_authorization(client, world, callers, route, caller):
    pending = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD",
        headers=world.auth("agent"),
    )
    assert pending.status_code == 202
    ids = {
        **world.ws,
        "agent_y_token": world.token_ids["agent_y"],
        "approval": pending.json["approval_id"],
    }
    response = client.open(
        fill(route.path, ids),
        method=route.method,
        json=fill(route.body, ids) if route.body is not None else None,
        headers=callers[caller],
    )
    assert response.status_code == route.expect[caller], response.get_data(as_text=True)[:300]
