"""Webhooks and the durable outbox: written with the event, delivered signed, retried, logged."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from conftest import World
from depth_support import (
    Receiver,
    add_secrets,
    decide,
    events,
    messages,
    pending_id,
    secret_url,
    set_messages,
)
from flask import Flask
from sqlalchemy import event, func, select, update

from app import outbox, worker
from app.extensions import db
from app.models import ApprovalRequest, OutboxAttempt, OutboxMessage, utcnow
from app.policy import POLICY, ActionPolicy


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def hooks_url(world: World, workspace: str = "acme") -> str:
    return f"/api/workspaces/{world.ws[workspace]}/webhooks"


def make_webhook(
    client, world: World, url: str, events=("created",), workspace="acme", who="alice"
):
    response = client.post(
        hooks_url(world, workspace),
        json={"url": url, "events": list(events)},
        headers=world.auth(who),
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def run_worker(app: Flask) -> str:
    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    return result.output


def deliveries(client, world: World, hook: dict, workspace: str = "acme") -> list[dict]:
    response = client.get(
        f"{hooks_url(world, workspace)}/{hook['id']}/deliveries", headers=world.auth("alice")
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["deliveries"]


# ---- managing webhooks -------------------------------------------------------------------------

pytestmark = pytest.mark.gate


def test_owner_creates_lists_and_deletes_a_webhook(client, world):
    made = make_webhook(client, world, "https://hooks.example.com/cs", ["created", "decided"])
    assert made["secret"].startswith("whsec_")
    assert made["events"] == ["created", "approved", "denied"]
    assert (made["format"], made["created_by"]) == ("json", "user:alice")

    listed = client.get(hooks_url(world), headers=world.auth("alice")).get_json()["webhooks"]
    assert [hook["id"] for hook in listed] == [made["id"]]
    assert "secret" not in listed[0]
    assert made["secret"] not in str(listed)

    gone = client.delete(f"{hooks_url(world)}/{made['id']}", headers=world.auth("alice"))
    assert gone.status_code == 204
    assert client.get(hooks_url(world), headers=world.auth("alice")).get_json()["webhooks"] == []
    again = client.delete(f"{hooks_url(world)}/{made['id']}", headers=world.auth("alice"))
    assert again.status_code == 404


def test_a_service_token_may_manage_webhooks(client, world):
    made = make_webhook(client, world, "https://hooks.example.com/cs", who="service")
    assert made["created_by"] == "service:service"


@pytest.mark.parametrize("who", ["agent", "agent_staging", "carol", "victor", "mallory"])
def test_agents_approvers_viewers_and_outsiders_may_not(client, world, who):
    for method, url in (
        ("post", hooks_url(world, "api")),
        ("get", hooks_url(world, "api")),
    ):
        response = getattr(client, method)(
            url,
            json={"url": "https://h.example.com", "events": ["created"]},
            headers=world.auth(who),
        )
        assert response.status_code in (403, 404), (who, method)


def test_a_webhook_of_another_workspace_is_not_found(client, world):
    made = make_webhook(client, world, "https://h.example.com", workspace="staging")
    response = client.delete(
        f"{hooks_url(world, 'prod')}/{made['id']}", headers=world.auth("alice")
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://h.example.com/x", "events": ["created"]}, "url"),
        ({"url": "https://user:pw@h.example.com/x", "events": ["created"]}, "url"),
        ({"url": "https://token@h.example.com/x", "events": ["created"]}, "url"),
        ({"url": "https:///nohost", "events": ["created"]}, "url"),
        ({"url": "https://h.example.com:99999/", "events": ["created"]}, "url"),
        ({"url": "https://h.example.com/a b", "events": ["created"]}, "url"),
        ({"url": "https://h.example.com/" + "x" * 2048, "events": ["created"]}, "url"),
        ({"url": "javascript:alert(1)", "events": ["created"]}, "url"),
        ({"url": "https://h.example.com", "events": []}, "events"),
        ({"url": "https://h.example.com", "events": ["deleted"]}, "events.0"),
        ({"url": "https://h.example.com", "events": ["created"], "format": "xml"}, "format"),
        ({"url": "https://h.example.com", "events": ["created"], "secret": "mine"}, "secret"),
    ],
)
def test_bad_targets_and_subscriptions_are_refused(client, world, body, field):
    response = client.post(hooks_url(world), json=body, headers=world.auth("alice"))
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["field"] == field


def test_url_checks_directly():
    assert outbox.check_url("http://127.0.0.1:8080/hook?x=1") == "http://127.0.0.1:8080/hook?x=1"
    with pytest.raises(ValueError, match="credentials"):
        outbox.check_url("https://a:b@example.com")


# ---- written in the same transaction as the event ---------------------------------------------


def test_events_are_owed_to_subscribed_webhooks_on_the_chain_only(app, client, world):
    on_api = make_webhook(client, world, "https://a.example.com", ["created"], workspace="api")
    on_acme = make_webhook(client, world, "https://b.example.com", ["created", "approved"])
    make_webhook(client, world, "https://c.example.com", ["created"], workspace="staging")
    make_webhook(client, world, "https://d.example.com", ["consumed"], workspace="prod")

    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    owed = messages(app)
    assert sorted(m.webhook_id for m in owed) == [on_api["id"], on_acme["id"]]
    created = events(app, "created")[0]
    assert {m.event_id for m in owed} == {created.id}
    assert all(m.status == "pending" and m.attempts == 0 for m in owed)

    decide(client, world, approval_id, "carol")
    assert len(messages(app)) == 3  # + approved, to acme's webhook only


def test_no_event_no_notification_a_failed_gate_leaves_no_message(app, client, world, monkeypatch):
    make_webhook(client, world, "https://a.example.com", ["created"])
    monkeypatch.setitem(
        POLICY, "secret.delete", ActionPolicy("secret.delete", "Delete {no_such_field}")
    )
    assert client.delete(secret_url(world), headers=world.auth("agent")).status_code == 503
    assert messages(app) == []
    assert events(app) == []


def test_deleting_a_webhook_drops_what_it_was_still_owed(app, client, world):
    hook = make_webhook(client, world, "https://a.example.com", ["created"])
    pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert len(messages(app)) == 1
    client.delete(f"{hooks_url(world)}/{hook['id']}", headers=world.auth("alice"))
    assert messages(app) == []


# ---- delivery ----------------------------------------------------------------------------------


def test_delivery_is_signed_and_logged(app, client, world, receiver):
    hook = make_webhook(client, world, receiver.url, ["created", "approved"])
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    decide(client, world, approval_id, "carol")

    assert "delivered 2 notification(s)" in run_worker(app)
    got = receiver.received()
    assert [r.json["event"] for r in got] == ["created", "approved"]
    for request in got:
        assert request.headers["Content-Type"] == "application/json"
        assert outbox.verify_signature(
            hook["secret"], request.headers["X-Countersign-Signature"], request.body
        )
    created = got[0].json
    assert created["approval"]["summary"] == "Delete secret 'DB_PASSWORD' in acme / prod / api"
    assert created["approval"]["url"] == f"/api/approvals/{approval_id}"
    assert created["actor"] == "agent:agent"

    log = deliveries(client, world, hook)
    assert [d["event"] for d in log] == ["approved", "created"]  # newest first
    assert {str(d["id"]) for d in log} == {r.headers["X-Countersign-Delivery"] for r in got}
    for entry in log:
        assert (entry["status"], entry["attempts"], entry["last_status_code"]) == (
            "delivered",
            1,
            204,
        )
        assert [(a["attempt"], a["status_code"], a["error"]) for a in entry["log"]] == [
            (1, 204, None)
        ]
    assert run_worker(app) == ""  # nothing left, nothing sent twice
    assert receiver.received() == []


def test_a_receiver_down_for_a_while_loses_nothing(app, client, world, policy_apps):
    down = Receiver()
    port, url = down.port, down.url
    down.stop()  # connections are refused from here on
    tuned = policy_apps.build(COUNTERSIGN_WEBHOOK_TIMEOUT=2)
    hook = make_webhook(client, world, url, ["created", "approved", "consumed"])
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    decide(client, world, approval_id, "carol")
    assert client.delete(secret_url(world), headers=world.auth("agent")).status_code == 204

    assert "3 notification(s) failed and will be retried" in run_worker(tuned)
    owed = messages(tuned)
    assert [(m.status, m.attempts) for m in owed] == [("pending", 1)] * 3
    assert all(m.next_attempt_at > utcnow() and m.lease_owner is None for m in owed)
    assert all(m.last_status_code is None and m.last_error for m in owed)
    assert run_worker(tuned) == ""  # not due yet: backoff

    set_messages(tuned, next_attempt_at=utcnow() - timedelta(seconds=1))  # an hour passes
    assert "3 notification(s) failed" in run_worker(tuned)
    set_messages(tuned, next_attempt_at=utcnow() - timedelta(seconds=1))

    up = Receiver(port)
    try:
        assert "delivered 3 notification(s)" in run_worker(tuned)
        got = up.received()
    finally:
        up.stop()
    assert sorted(r.json["event"] for r in got) == ["approved", "consumed", "created"]
    assert len({r.headers["X-Countersign-Delivery"] for r in got}) == 3
    for entry in deliveries(client, world, hook):
        assert entry["status"] == "delivered"
        assert [a["status_code"] for a in entry["log"]] == [None, None, 204]
        assert "Connection refused" in entry["log"][0]["error"]


def test_the_last_failed_try_moves_a_message_to_the_dead_letter(
    app, client, world, policy_apps, receiver
):
    receiver.status = 500
    tuned = policy_apps.build(COUNTERSIGN_WEBHOOK_MAX_ATTEMPTS=2)
    hook = make_webhook(client, world, receiver.url, ["created"])
    pending_id(client.delete(secret_url(world), headers=world.auth("agent")))

    assert "1 notification(s) failed and will be retried" in run_worker(tuned)
    set_messages(tuned, next_attempt_at=utcnow() - timedelta(seconds=1))
    assert "1 notification(s) failed for the last time (dead letter)" in run_worker(tuned)
    [entry] = deliveries(client, world, hook)
    assert (entry["status"], entry["attempts"], entry["next_attempt_at"]) == ("dead", 2, None)
    assert [(a["status_code"], a["error"]) for a in entry["log"]] == [(500, "HTTP 500")] * 2
    assert len(receiver.received()) == 2
    set_messages(tuned, next_attempt_at=utcnow() - timedelta(seconds=1))
    assert run_worker(tuned) == ""  # a dead letter is never retried by itself
    dead = client.get(
        f"{hooks_url(world)}/{hook['id']}/deliveries?status=dead", headers=world.auth("alice")
    )
    assert len(dead.get_json()["deliveries"]) == 1


def test_a_redirect_is_a_failure_never_followed(app, client, world, receiver):
    receiver.status = 302
    make_webhook(client, world, receiver.url, ["created"])
    pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert "failed and will be retried" in run_worker(app)
    [message] = messages(app)
    assert (message.last_status_code, message.last_error) == (302, "HTTP 302")
    assert len(receiver.received()) == 1  # and nothing went to the Location


def test_a_lapsed_lease_is_taken_over_and_a_live_one_is_respected(app, client, world, receiver):
    make_webhook(client, world, receiver.url, ["created"])
    pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    set_messages(app, lease_owner="worker-that-died", lease_until=utcnow() + timedelta(minutes=1))
    assert run_worker(app) == ""
    assert receiver.received() == []
    set_messages(app, lease_until=utcnow() - timedelta(seconds=1))
    assert "delivered 1 notification(s)" in run_worker(app)
    assert len(receiver.received()) == 1


def test_the_default_retry_schedule_outlasts_an_hour_down():
    settings = outbox.DeliverySettings()
    least = [
        outbox.retry_delay(attempt, settings.backoff, settings.backoff_cap, random.Random(seed))
        for seed, attempt in enumerate(range(1, settings.max_attempts))
    ]
    assert sum(least) > 3600
    low = outbox.retry_delay(5, 10, 3600, rng=_Fixed(0.0))
    high = outbox.retry_delay(5, 10, 3600, rng=_Fixed(1.0))
    assert (low, high) == (80.0, 160.0)  # jitter within half to all of the doubled delay
    assert outbox.retry_delay(30, 10, 3600, rng=_Fixed(1.0)) == 3600.0


class _Fixed(random.Random):
    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_event_masks_round_trip():
    mask = outbox.event_mask(["decided", "escalated"])
    assert outbox.event_names(mask) == ["escalated", "approved", "denied"]
    with pytest.raises(ValueError, match="unknown event 'deleted'"):
        outbox.event_mask(["deleted"])


# ---- several workers, and the hot path ---------------------------------------------------------


def run_workers_together(app: Flask, count: int) -> list[worker.Report]:
    barrier = threading.Barrier(count)
    reports: list[worker.Report] = []
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            with app.app_context():
                barrier.wait(timeout=30)
                reports.append(worker.run_once(app.config, f"test-worker-{index}"))
        except BaseException as error:  # surfaced below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    return reports


@pytest.mark.postgres_only
def test_two_workers_never_deliver_twice_nor_expire_twice(app, client, world, receiver):
    make_webhook(client, world, receiver.url, ["created", "expired"])
    names = [f"S{i}" for i in range(12)]
    add_secrets(client, world, names)
    ids = [
        pending_id(client.delete(secret_url(world, name), headers=world.auth("agent")))
        for name in names
    ]
    with app.app_context():
        db.session.execute(
            update(ApprovalRequest).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()

    reports = run_workers_together(app, 2)
    assert sum(r.expired for r in reports) == len(ids)
    expired = Counter(e.approval_id for e in events(app, "expired"))
    assert expired == Counter(ids)  # each exactly once

    # Whatever the first run left (a worker may finish before the other's events commit).
    reports += run_workers_together(app, 2)
    got = receiver.received()
    per_delivery = Counter(r.headers["X-Countersign-Delivery"] for r in got)
    assert len(per_delivery) == 2 * len(ids)
    assert set(per_delivery.values()) == {1}
    assert sum(r.delivered for r in reports) == 2 * len(ids)
    with app.app_context():
        attempts = db.session.execute(select(func.count()).select_from(OutboxAttempt)).scalar()
        delivered = db.session.execute(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.status == "delivered")
        ).scalar()
    assert attempts == delivered == 2 * len(ids)


@pytest.mark.postgres_only
def test_the_gate_hot_path_adds_three_statements_and_only_when_an_event_is_written(app, world):
    """Creating or consuming: the chain lock, the head read, the outbox insert. Polling: none."""
    client = app.test_client()
    make_webhook(client, world, "https://a.example.com", ["created", "consumed"])
    with app.app_context():
        engine = db.engine
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append(" ".join(statement.split()))

    def added() -> list[str]:
        return [
            s.split(" FROM")[0].split(" (")[0]
            for s in seen
            if "pg_advisory_xact_lock" in s
            or s.startswith("SELECT approval_events.hash")
            or s.startswith("INSERT INTO outbox_messages")
        ]

    event.listen(engine, "before_cursor_execute", record)
    try:
        url = secret_url(world)
        approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
        assert added() == [
            "SELECT pg_advisory_xact_lock(%(key)s)",
            "SELECT approval_events.hash",
            "INSERT INTO outbox_messages",
        ]
        seen.clear()
        assert pending_id(client.delete(url, headers=world.auth("agent"))) == approval_id
        assert added() == []
        decide(client, world, approval_id, "carol")
        seen.clear()
        assert client.delete(url, headers=world.auth("agent")).status_code == 204
        assert len(added()) == 3
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(messages(app)) == 2


def test_an_api_request_never_waits_for_a_receiver(app, client, world, receiver):
    """Delivery happens in the worker: the gate answers even when the receiver hangs up."""
    receiver.stop()
    make_webhook(client, world, receiver.url, ["created"])
    assert pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert len(messages(app)) == 1
