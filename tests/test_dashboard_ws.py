"""The dashboard websocket with a real client over a real server (werkzeug, threaded)."""

from __future__ import annotations

import re

import pytest
from simple_websocket import Client

from app.dashboard.live import open_sockets
from tests.e2e.support import (
    WsRefused,
    agent_delete_secret,
    csrf_from,
    login_session,
    open_ws,
    receive_until,
)


@pytest.fixture
def server(app, live_server):
    """The live server; at teardown, waits until every socket handler has let go of the
    database (werkzeug's handler threads outlive the server, the engine is disposed next)."""
    yield live_server
    assert open_sockets(app).wait_closed(timeout=10)


def opened(base_url, world, username, query="view=pending") -> Client:
    ws = open_ws(base_url, login_session(base_url, username, world.password), query=query)
    first = ws.receive(timeout=10)  # the resync every socket starts with
    assert first is not None and 'id="pending-count"' in first
    return ws


def test_no_session_is_refused(server, world):
    with pytest.raises(WsRefused):
        open_ws(server.url, None)


def test_foreign_origin_is_refused(server, world):
    http = login_session(server.url, "carol", world.password)
    with pytest.raises(WsRefused):
        open_ws(server.url, http, origin="https://evil.example")
    with pytest.raises(WsRefused):
        open_ws(server.url, http, origin=None)


def test_listed_origin_is_accepted(app, server, world):
    app.config["COUNTERSIGN_ALLOWED_ORIGINS"] = ["https://dash.example"]
    http = login_session(server.url, "carol", world.password)
    ws = open_ws(server.url, http, origin="https://dash.example")
    try:
        assert 'id="pending-count"' in ws.receive(timeout=10)
    finally:
        ws.close()


def test_open_sends_the_full_pending_list(server, world):
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]
    ws = open_ws(server.url, login_session(server.url, "carol", world.password))
    try:
        first = ws.receive(timeout=10)
        assert 'id="pending-rows" class="approvals" hx-swap-oob="innerHTML"' in first
        assert f'id="approval-{approval_id}"' in first and 'data-count="1"' in first
    finally:
        ws.close()


def test_events_reach_exactly_the_users_who_may_see_them(app, server, world):
    from app.extensions import db
    from app.models import Secret

    with app.app_context():
        db.session.add(Secret(workspace_id=world.ws["staging"], name="CI_TOKEN", value="x"))
        db.session.commit()
    carol, dave = opened(server.url, world, "carol"), opened(server.url, world, "dave")
    try:
        in_api = agent_delete_secret(
            server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
        ).json()["approval_id"]
        receive_until(carol, lambda m: f'id="approval-{in_api}"' in m)
        in_staging = agent_delete_secret(
            server.url, world.tokens["agent"], world.ws["staging"], "CI_TOKEN"
        ).json()["approval_id"]
        # Dave's socket delivers in order: the staging row arrives, the api row never did.
        seen = receive_until(dave, lambda m: f'id="approval-{in_staging}"' in m)
        assert not any(f"approval-{in_api}" in message for message in seen)
        assert not any("DB_PASSWORD" in message for message in seen)
    finally:
        carol.close()
        dave.close()


def test_dashboard_decision_reaches_the_other_dashboards(server, world):
    carol_http = login_session(server.url, "carol", world.password)
    carol = opened(server.url, world, "carol")
    alice = opened(server.url, world, "alice")
    try:
        approval_id = agent_delete_secret(
            server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
        ).json()["approval_id"]
        receive_until(alice, lambda m: f'id="approval-{approval_id}"' in m)
        receive_until(carol, lambda m: f'id="approval-{approval_id}"' in m)
        token = csrf_from(carol_http.get(f"{server.url}/").text)
        response = carol_http.post(
            f"{server.url}/approvals/{approval_id}/decision",
            data={"decision": "approve", "csrf_token": token},
            headers={"HX-Request": "true"},
            timeout=10,
        )
        assert response.status_code == 200
        gone = f'<div id="approval-{approval_id}" hx-swap-oob="delete"></div>'
        seen = receive_until(alice, lambda m: gone in m)
        assert "was approved by carol" in seen[-1]
        assert re.search(r'id="pending-count"[^>]*data-count="0"', seen[-1])
        receive_until(carol, lambda m: gone in m)
        retry = agent_delete_secret(
            server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
        )
        assert retry.status_code == 204
    finally:
        carol.close()
        alice.close()


def test_detail_socket_follows_its_request(server, world):
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]
    victor = opened(server.url, world, "victor", query=f"view=detail&approval={approval_id}")
    carol_http = login_session(server.url, "carol", world.password)
    try:
        token = csrf_from(carol_http.get(f"{server.url}/").text)
        carol_http.post(
            f"{server.url}/approvals/{approval_id}/decision",
            data={"decision": "deny", "reason": "freeze", "csrf_token": token},
            timeout=10,
        )
        seen = receive_until(
            victor, lambda m: f'id="approval-detail-{approval_id}"' in m and "freeze" in m
        )
        assert 'class="badge badge-denied"' in seen[-1]
        assert "/decision" not in "".join(seen)  # a viewer never gets the controls
    finally:
        victor.close()
