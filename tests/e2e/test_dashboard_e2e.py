"""The dashboard in a real Chromium: live rows, approve, deny, per-user isolation, title count."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.dashboard.live import open_sockets
from app.extensions import db
from app.models import Secret
from tests.e2e.support import CHROMIUM, CHROMIUM_ARGS, agent_delete_secret

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def server(app, live_server):
    """The live server; at teardown, waits until every socket handler has let go of the
    database (werkzeug's handler threads outlive the server, the engine is disposed next)."""
    yield live_server
    assert open_sockets(app).wait_closed(timeout=10)


@pytest.fixture
def open_dashboard(browser: Browser, server) -> Iterator:
    """Log in through the form in a fresh context; wait for the socket's first resync."""
    contexts = []

    def open_(username: str, password: str, on_socket=None) -> Page:
        context = browser.new_context(base_url=server.url)
        contexts.append(context)
        page = context.new_page()
        if on_socket is not None:
            page.route_web_socket(re.compile(r"/ws"), on_socket)
        page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm on Approve
        frames: list[str] = []
        page.on(
            "websocket",
            lambda ws: ws.on(
                "framereceived",
                lambda payload: frames.append(payload if isinstance(payload, str) else ""),
            ),
        )
        page.frames_received = frames  # type: ignore[attr-defined]
        page.goto("/")
        expect(page).to_have_url(re.compile(r"/login\?next="))
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        page.click("button:has-text('Log in')")
        expect(page.locator("#live-status")).to_have_attribute("data-live", "live")
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        return page

    yield open_
    for context in contexts:  # before the server stops, so its socket handlers end cleanly
        context.close()


def test_approve_live_with_isolation_and_history(app, server, world, open_dashboard):
    with app.app_context():
        db.session.add(Secret(workspace_id=world.ws["staging"], name="CI_TOKEN", value="x"))
        db.session.commit()
    carol = open_dashboard("carol", world.password)
    dave = open_dashboard("dave", world.password)
    expect(carol).to_have_title("Countersign")

    response = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    )
    assert response.status_code == 202
    in_api = response.json()["approval_id"]
    row = carol.locator(f"#approval-{in_api}")
    expect(row).to_be_visible()  # no reload: pushed over the websocket
    expect(row).to_contain_text("DB_PASSWORD")
    expect(row.locator(".breadcrumb")).to_have_text(re.compile(r"acme\s*prod\s*api"))
    expect(carol).to_have_title("(1) Countersign")

    # Dave (approver of staging only) gets the staging request, and never got the api one:
    # his socket delivers in order, so had the api row been sent it would have come first.
    in_staging = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["staging"], "CI_TOKEN"
    ).json()["approval_id"]
    expect(dave.locator(f"#approval-{in_staging}")).to_be_visible()
    expect(dave).to_have_title("(1) Countersign")
    expect(dave.locator(f"#approval-{in_api}")).to_have_count(0)
    assert not any(f"approval-{in_api}" in frame for frame in dave.frames_received)
    expect(carol.locator(f"#approval-{in_staging}")).to_have_count(0)

    row.get_by_role("button", name="Approve").click()
    expect(carol.locator(f"#approval-{in_api}")).to_have_count(0)
    expect(carol).to_have_title("Countersign")
    retry = agent_delete_secret(server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD")
    assert retry.status_code == 204

    carol.get_by_role("link", name="History").click()
    settled = carol.locator(f"#history-{in_api}")
    expect(settled).to_be_visible()
    expect(settled).to_contain_text("consumed")
    assert not any(f"approval-{in_api}" in frame for frame in dave.frames_received)


def test_deny_with_reason_reaches_the_agent(app, server, world, open_dashboard):
    carol = open_dashboard("carol", world.password)
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]
    row = carol.locator(f"#approval-{approval_id}")
    expect(row).to_be_visible()
    expect(carol).to_have_title("(1) Countersign")

    row.get_by_text("Deny…").click()
    deny = row.get_by_role("button", name="Deny", exact=True)
    deny.click()  # the reason is required: the browser refuses the empty form
    expect(row).to_be_visible()
    row.get_by_placeholder("Why?").fill("change freeze until Monday")
    deny.click()
    expect(carol.locator(f"#approval-{approval_id}")).to_have_count(0)
    expect(carol).to_have_title("Countersign")
    expect(carol.locator("#notices")).to_contain_text(f"Denied request #{approval_id}")

    retry = agent_delete_secret(server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD")
    assert retry.status_code == 403
    assert retry.json()["reason"] == "change freeze until Monday"


def test_detail_panel_follows_a_decision_made_elsewhere(app, server, world, open_dashboard):
    alice = open_dashboard("alice", world.password)
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]
    alice.goto(f"/approvals/{approval_id}")
    expect(alice.locator("#live-status")).to_have_attribute("data-live", "live")
    panel = alice.locator(f"#approval-detail-{approval_id}")
    expect(panel.get_by_role("button", name="Approve")).to_be_visible()
    decide_through_api(server.url, world, approval_id, "deny", "already handled")
    expect(panel).to_contain_text("already handled")
    expect(panel.get_by_role("button", name="Approve")).to_have_count(0)


def test_refused_decision_shows_a_message_not_a_broken_page(app, server, world, open_dashboard):
    alice = open_dashboard("alice", world.password)
    # This page hears nothing live, so it still offers the buttons after carol has decided.
    alice.route_web_socket(re.compile(r"/ws"), lambda ws: None)
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]
    alice.goto("/")
    row = alice.locator(f"#approval-{approval_id}")
    expect(row.get_by_role("button", name="Approve")).to_be_visible()
    decide_through_api(server.url, world, approval_id, "deny", "carol was faster")
    row.get_by_role("button", name="Approve").click()
    expect(alice.locator("#notices")).to_contain_text(
        f"Request #{approval_id} is no longer pending: it is denied"
    )
    expect(row).to_contain_text("denied")  # the row now shows what really happened
    expect(row.get_by_role("button", name="Approve")).to_have_count(0)
    expect(alice.get_by_role("heading", name="Pending requests")).to_be_visible()


def decide_through_api(base_url, world, approval_id, decision, reason):
    response = requests.post(
        f"{base_url}/api/approvals/{approval_id}/decision",
        json={"decision": decision, "reason": reason},
        headers=world.auth("carol"),
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_reconnect_resyncs_what_the_page_missed(app, server, world, open_dashboard):
    sockets = []

    def through(route):  # the page's sockets; only the first is relayed at once
        sockets.append(route)
        if len(sockets) == 1:
            route.connect_to_server()

    carol = open_dashboard("carol", world.password, on_socket=through)
    status = carol.locator("#live-status")
    # A blip: the socket drops as when the server restarts (1012); the ws extension reconnects.
    sockets[0].close(code=1012, reason="restart")
    expect(status).to_have_attribute("data-live", "open")  # the new socket, not yet relayed
    assert len(sockets) == 2
    approval_id = agent_delete_secret(
        server.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
    ).json()["approval_id"]  # happens while the page is not connected to the server
    expect(carol.locator(f"#approval-{approval_id}")).to_have_count(0)
    sockets[1].connect_to_server()  # the server is back: its opening resync brings the row
    expect(status).to_have_attribute("data-live", "live")
    expect(carol.locator(f"#approval-{approval_id}")).to_be_visible()
    expect(carol).to_have_title("(1) Countersign")
