"""The audit page (chain status, the events a user may see) and the webhook delivery log."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from depth_support import Receiver, add_secrets, decide, pending_id, secret_url
from sqlalchemy import select, text

from app.extensions import db
from app.models import ApprovalEvent
from tests.e2e.support import login_client

EVENT_ROW = re.compile(r'id="event-(\d+)"')


def as_user(app, world, username: str):
    browser = app.test_client()
    assert login_client(browser, username, world.password).status_code == 303
    return browser


def event_ids(app, approval_id: int) -> list[int]:
    with app.app_context():
        return list(
            db.session.execute(
                select(ApprovalEvent.id)
                .where(ApprovalEvent.approval_id == approval_id)
                .order_by(ApprovalEvent.id)
            ).scalars()
        )


def head_hash(app) -> str:
    with app.app_context():
        return db.session.execute(
            select(ApprovalEvent.hash).order_by(ApprovalEvent.id.desc()).limit(1)
        ).scalar_one()


@pytest.fixture
def gated(client, world) -> int:
    """Three events on one request in `api`: created, approved (carol), consumed."""
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert decide(client, world, approval_id, "carol").status_code == 200
    assert client.delete(secret_url(world), headers=world.auth("agent")).status_code == 204
    return approval_id


# ---- audit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/audit", "/workspaces/1/webhooks"])
def test_pages_need_a_login(client, world, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")


def test_audit_page_shows_an_intact_chain_then_the_first_broken_event(app, world, gated):
    browser = as_user(app, world, "alice")
    page = browser.get("/audit").get_data(as_text=True)
    assert 'href="/audit" aria-current="page">Audit</a>' in page
    assert "chain-intact" in page and "Chain intact" in page
    assert "All 3 events verified." in page
    assert head_hash(app) in page
    created, approved, consumed = event_ids(app, gated)
    assert EVENT_ROW.findall(page) == [str(consumed), str(approved), str(created)]

    with app.app_context():
        db.session.execute(
            text("UPDATE approval_events SET actor = 'x' WHERE id = :id"), {"id": approved}
        )
        db.session.commit()
    page = browser.get("/audit").get_data(as_text=True)
    assert "chain-broken" in page and "Chain intact" not in page
    assert f'id="broken-event">#{approved}<' in page
    assert "its content does not match its hash (edited)" in page
    assert "The 1 event before it verified." in page
    assert f'id="event-{approved}" class="is-broken"' in page


def test_audit_event_list_shows_only_requests_the_user_may_see(app, client, world, gated):
    add_secrets(client, world, ["CACHE_KEY"], workspace="staging")
    staging_id = pending_id(
        client.delete(secret_url(world, "CACHE_KEY", "staging"), headers=world.auth("agent"))
    )
    api_events = {str(i) for i in event_ids(app, gated)}
    staging_events = {str(i) for i in event_ids(app, staging_id)}

    def listed(username: str) -> set[str]:
        page = as_user(app, world, username).get("/audit").get_data(as_text=True)
        assert "Chain intact" in page and "All 4 events verified." in page  # status is global
        return set(EVENT_ROW.findall(page))

    assert listed("alice") == api_events | staging_events  # owner of the root
    assert listed("carol") == api_events
    assert listed("victor") == api_events
    assert listed("dave") == staging_events
    assert listed("mallory") == set()


# ---- webhooks ------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def make_webhook(client, world, url: str, workspace: str = "acme") -> dict:
    response = client.post(
        f"/api/workspaces/{world.ws[workspace]}/webhooks",
        json={"url": url, "events": ["created", "decided"]},
        headers=world.auth("alice"),
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def test_delivery_log_shows_delivered_and_failed_attempts_never_the_secret(
    app, client, world, receiver
):
    down = Receiver()
    down_url = down.url
    down.stop()  # connections to it are refused from here on
    good = make_webhook(client, world, receiver.url)
    bad = make_webhook(client, world, down_url)
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    assert len(receiver.received()) == 1

    browser = as_user(app, world, "alice")
    response = browser.get(f"/workspaces/{world.ws['acme']}/webhooks")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert good["secret"] not in page and bad["secret"] not in page and "whsec_" not in page
    good_part = page[
        page.index(f'id="webhook-{good["id"]}"') : page.index(f'id="webhook-{bad["id"]}"')
    ]
    bad_part = page[page.index(f'id="webhook-{bad["id"]}"') :]
    assert receiver.url in good_part and down_url in bad_part
    assert "created, approved, denied" in good_part and "json" in good_part
    assert f'href="/approvals/{approval_id}">#{approval_id}</a>' in good_part
    assert "badge-delivered" in good_part and "HTTP 204" in good_part
    assert "badge-pending" in bad_part and "Connection refused" in bad_part
    assert "1 attempt<" in bad_part and " left</time>" in bad_part  # the retry's time


def test_workspaces_page_links_webhooks_for_owners_only(app, world):
    page = as_user(app, world, "alice").get("/workspaces").get_data(as_text=True)
    for workspace_id in world.ws.values():
        assert f'href="/workspaces/{workspace_id}/webhooks"' in page
    page = as_user(app, world, "carol").get("/workspaces").get_data(as_text=True)
    assert "/webhooks" not in page


def test_an_owner_of_an_ancestor_sees_a_descendants_webhooks(app, client, world):
    hook = make_webhook(client, world, "http://127.0.0.1:9/hook", workspace="api")
    page = as_user(app, world, "alice").get(f"/workspaces/{world.ws['api']}/webhooks")
    assert page.status_code == 200
    text_ = page.get_data(as_text=True)
    assert "acme / prod / api" in text_ and "http://127.0.0.1:9/hook" in text_
    assert "Nothing delivered or owed yet." in text_ and hook["secret"] not in text_


@pytest.mark.parametrize("username", ["carol", "victor", "dave", "mallory"])
def test_non_owners_get_a_403_page(app, client, world, username):
    hook = make_webhook(client, world, "http://127.0.0.1:9/hook", workspace="api")
    response = as_user(app, world, username).get(f"/workspaces/{world.ws['api']}/webhooks")
    assert response.status_code == 403
    page = response.get_data(as_text=True)
    assert response.mimetype == "text/html" and "Forbidden" in page
    assert "shown to the owners of the workspace" in page
    assert "http://127.0.0.1:9/hook" not in page and hook["secret"] not in page


def test_an_unknown_workspace_is_404(app, world):
    assert as_user(app, world, "alice").get("/workspaces/999999/webhooks").status_code == 404
