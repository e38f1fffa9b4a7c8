"""GET /api/approvals/<id>?wait=N: event-driven long-poll that holds no database connection."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import text

from app.events import publisher_of
from app.extensions import db


def secret_delete(client, world) -> int:
    response = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD", headers=world.auth("agent")
    )
    assert response.status_code == 202
    return response.json["approval_id"]


class WaiterCounter:
    """Counts long-poll subscriptions as the server makes them, and wakes the test at a target."""

    def __init__(self, app, monkeypatch, target: int) -> None:
        self.target = target
        self.count = 0
        self.reached = threading.Event()
        self._lock = threading.Lock()
        hub = publisher_of(app).hub
        original = hub.subscribe

        def counting_subscribe(purpose: str = "dashboard"):
            subscription = original(purpose)
            if purpose == "longpoll":
                with self._lock:
                    self.count += 1
                    if self.count >= self.target:
                        self.reached.set()
            return subscription

        monkeypatch.setattr(hub, "subscribe", counting_subscribe)


def test_wait_returns_within_a_second_of_the_decision(app, client, world, live_server, monkeypatch):
    approval_id = secret_delete(client, world)
    waiting = WaiterCounter(app, monkeypatch, target=1)
    result = {}

    def wait() -> None:
        response = requests.get(
            f"{live_server.url}/api/approvals/{approval_id}?wait=30",
            headers=world.auth("agent"),
            timeout=60,
        )
        result["at"] = time.monotonic()
        result["body"] = response.json()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert waiting.reached.wait(10), "the long-poll never subscribed"
    decided_at = time.monotonic()
    decision = client.post(
        f"/api/approvals/{approval_id}/decision",
        json={"decision": "approve", "reason": "ok"},
        headers=world.auth("alice"),
    )
    assert decision.status_code == 200
    waiter.join(35)
    assert result["body"]["status"] == "approved"
    assert result["at"] - decided_at < 1.0


def test_wait_returns_the_pending_state_when_nobody_decides(client, world):
    approval_id = secret_delete(client, world)
    started = time.monotonic()
    response = client.get(f"/api/approvals/{approval_id}?wait=1", headers=world.auth("agent"))
    assert response.status_code == 200
    assert response.json["status"] == "pending"
    assert time.monotonic() - started >= 0.9


def test_wait_on_a_decided_request_returns_at_once(client, world):
    approval_id = secret_delete(client, world)
    client.post(
        f"/api/approvals/{approval_id}/decision",
        json={"decision": "deny", "reason": "no"},
        headers=world.auth("alice"),
    )
    started = time.monotonic()
    response = client.get(f"/api/approvals/{approval_id}?wait=1000", headers=world.auth("agent"))
    assert response.json["status"] == "denied"
    assert time.monotonic() - started < 0.9


@pytest.mark.parametrize("wait", ["abc", "-1", "nan", "inf", ""])
def test_bad_wait_values_are_400(client, world, wait):
    approval_id = secret_delete(client, world)
    response = client.get(f"/api/approvals/{approval_id}?wait={wait}", headers=world.auth("agent"))
    assert response.status_code == 400
    assert response.json["field"] == "wait"


@pytest.mark.postgres_only
def test_200_waiters_share_a_handful_of_connections(app, client, world, live_server, monkeypatch):
    waiters = 200
    approval_id = secret_delete(client, world)
    waiting = WaiterCounter(app, monkeypatch, target=waiters)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=waiters)
    session.mount("http://", adapter)

    def wait() -> tuple[float, str]:
        response = session.get(
            f"{live_server.url}/api/approvals/{approval_id}?wait=30",
            headers=world.auth("agent"),
            timeout=60,
        )
        return time.monotonic(), response.json()["status"]

    with ThreadPoolExecutor(max_workers=waiters) as pool:
        futures = [pool.submit(wait) for _ in range(waiters)]
        assert waiting.reached.wait(30), f"only {waiting.count} waiters subscribed"
        with app.app_context():
            checked_out = db.engine.pool.checkedout()
            database_backends = db.session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            db.session.remove()
        print(
            f"\n{waiters} waiters: {checked_out} pooled connections checked out, "
            f"{database_backends} other backends on the database"
        )
        assert checked_out <= 10  # the last few subscribers may still be on their first read
        # Connections opened during the burst of initial reads stay idle in the pool; none is
        # held per waiter (that would be 200).
        assert database_backends < waiters // 4
        decided_at = time.monotonic()
        client.post(
            f"/api/approvals/{approval_id}/decision",
            json={"decision": "approve", "reason": "ok"},
            headers=world.auth("alice"),
        )
        results = [future.result(timeout=60) for future in futures]
    assert {status for _, status in results} == {"approved"}
    slowest = max(at for at, _ in results) - decided_at
    print(f"all {waiters} waiters answered {slowest:.3f}s after the decision")
    assert slowest < 5
