"""Time-based escalation: the worker raises a request one level per escalate_after, to the root.

Time is moved by editing escalate_at in the database, never by sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from conftest import World
from depth_support import (
    PolicyApps,
    Receiver,
    add_member,
    decide,
    events,
    pending_id,
    read,
    secret_url,
    set_request,
)
from flask import Flask

from app import outbox
from app.models import utcnow

pytestmark = pytest.mark.gate

ESCALATING = """
[actions."secret.delete"]
escalate_after = "2s"

[actions."workspace.delete"]
escalate_after = "2s"
"""


@pytest.fixture
def escalating(app, world: World, policy_apps: PolicyApps) -> Flask:
    tuned = policy_apps.build(ESCALATING, COUNTERSIGN_WEBHOOK_TIMEOUT=3)
    add_member(tuned.test_client(), world, "prod", "dave", "approver")
    return tuned


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def make_webhook(
    app: Flask, world: World, url: str, events: list[str], workspace="acme", fmt="json"
):
    response = app.test_client().post(
        f"/api/workspaces/{world.ws[workspace]}/webhooks",
        json={"url": url, "events": events, "format": fmt},
        headers=world.auth("alice"),
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def worker(app: Flask) -> str:
    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    return result.output


def due_now(app: Flask, approval_id: int) -> None:
    """Move the clock: make the next escalation due."""
    set_request(app, approval_id, escalate_at=utcnow() - timedelta(seconds=1))


def test_the_worker_escalates_level_by_level_and_webhooks_hear_it(escalating, world, receiver):
    hook = make_webhook(escalating, world, receiver.url, ["escalated"])
    client = escalating.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    fresh = read(client, world, approval_id)
    assert fresh["escalation_level"] == 0
    assert datetime.fromisoformat(fresh["next_escalation_at"]) > utcnow()

    assert "escalated" not in worker(escalating)  # not due yet
    assert receiver.received() == []

    due_now(escalating, approval_id)
    output = worker(escalating)
    assert "escalated 1 request(s)" in output
    assert "delivered 1 notification(s)" in output
    [delivery] = receiver.received()
    assert delivery.headers["X-Countersign-Event"] == "escalated"
    assert outbox.verify_signature(
        hook["secret"], delivery.headers["X-Countersign-Signature"], delivery.body
    )
    body = delivery.json
    assert body["event"] == "escalated"
    assert body["detail"] == {
        "level": 1,
        "workspace": {"id": world.ws["prod"], "name": "prod"},
        "approvers": ["dave"],
    }
    assert body["approval"]["id"] == approval_id
    assert body["delivery_id"] == int(delivery.headers["X-Countersign-Delivery"])

    after = read(client, world, approval_id)
    assert after["escalation_level"] == 1
    assert after["next_escalation_at"] is not None

    due_now(escalating, approval_id)
    assert "escalated 1 request(s)" in worker(escalating)
    [second] = receiver.received()
    assert second.json["detail"]["level"] == 2
    assert second.json["detail"]["workspace"]["name"] == "acme"
    assert second.json["detail"]["approvers"] == ["alice"]
    top = read(client, world, approval_id)
    assert (top["escalation_level"], top["next_escalation_at"]) == (2, None)  # the root

    assert "escalated" not in worker(escalating)
    assert [e["kind"] for e in top["events"]] == ["created", "escalated", "escalated"]
    assert [e["detail"]["level"] for e in top["events"][1:]] == [1, 2]


def test_the_signature_fails_for_a_tampered_body_a_wrong_secret_or_a_stale_time(
    escalating, world, receiver
):
    hook = make_webhook(escalating, world, receiver.url, ["escalated"])
    approval_id = pending_id(
        escalating.test_client().delete(secret_url(world), headers=world.auth("agent"))
    )
    due_now(escalating, approval_id)
    worker(escalating)
    [delivery] = receiver.received()
    header = delivery.headers["X-Countersign-Signature"]
    secret = hook["secret"]
    assert outbox.verify_signature(secret, header, delivery.body)
    tampered = delivery.body.replace(b'"level":1', b'"level":0')
    assert tampered != delivery.body
    assert not outbox.verify_signature(secret, header, tampered)
    assert not outbox.verify_signature(secret, header, delivery.body + b" ")
    assert not outbox.verify_signature("whsec_wrong", header, delivery.body)
    assert not outbox.verify_signature(secret, header, delivery.body, now=time.time() + 3600)
    assert not outbox.verify_signature(secret, None, delivery.body)
    assert not outbox.verify_signature(secret, "v1=abc", delivery.body)


def test_a_decided_request_is_not_escalated(escalating, world, receiver):
    make_webhook(escalating, world, receiver.url, ["escalated"])
    client = escalating.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert decide(client, world, approval_id, "carol").get_json()["status"] == "approved"
    assert read(client, world, approval_id)["next_escalation_at"] is None
    due_now(escalating, approval_id)  # even if a stale escalate_at were left behind
    assert "escalated" not in worker(escalating)
    assert receiver.received() == []
    assert events(escalating, "escalated") == []


def test_a_request_at_the_root_has_nowhere_to_escalate(escalating, world):
    client = escalating.test_client()
    response = client.delete(
        f"/api/workspaces/{world.ws['acme']}?recursive=true", headers=world.auth("agent")
    )
    approval_id = pending_id(response)
    assert read(client, world, approval_id)["next_escalation_at"] is None


def test_without_escalate_after_nothing_escalates(app, client, world):
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert read(client, world, approval_id)["next_escalation_at"] is None
    set_request(app, approval_id, created_at=utcnow() - timedelta(hours=23))
    assert "escalated" not in worker(app)


def test_slack_format_carries_a_readable_line(escalating, world, receiver):
    hook = make_webhook(escalating, world, receiver.url, ["escalated"], fmt="slack")
    assert hook["format"] == "slack"
    approval_id = pending_id(
        escalating.test_client().delete(secret_url(world), headers=world.auth("agent"))
    )
    due_now(escalating, approval_id)
    worker(escalating)
    [delivery] = receiver.received()
    assert set(delivery.json) == {"text"}
    text = delivery.json["text"]
    assert f"approval #{approval_id} escalated to level 1 (prod); approvers: dave" in text
    assert "Delete secret 'DB_PASSWORD' in acme / prod / api" in text
    assert outbox.verify_signature(
        hook["secret"], delivery.headers["X-Countersign-Signature"], delivery.body
    )
