"""Faults on real PostgreSQL: a read-only database and a restart in the middle of load."""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from collections import Counter

import psycopg
import pytest
import requests
from sqlalchemy import select, text

from app.events import RESYNC, publisher_of
from app.extensions import db
from app.models import Secret

pytestmark = pytest.mark.postgres_only


def admin_url() -> str:
    url = os.environ["TEST_DATABASE_URL"]
    return url.rsplit("/", 1)[0] + "/postgres"


def secret_exists(app, world) -> bool:
    with app.app_context():
        found = db.session.execute(
            select(Secret).where(
                Secret.workspace_id == world.ws["api"], Secret.name == "DB_PASSWORD"
            )
        ).scalar_one_or_none()
        db.session.remove()
        return found is not None


@pytest.fixture
def read_only_database(app):
    name = os.environ["TEST_DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with app.app_context():
        db.engine.dispose()  # new connections pick up the setting
    yield
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    with app.app_context():
        db.engine.dispose()


def test_read_only_database_fails_closed_with_a_clear_error(app, client, world, read_only_database):
    path = f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"
    gated = client.delete(path, headers=world.auth("agent"))
    assert gated.status_code == 503
    assert "read-only" in gated.json["message"]
    ungated = client.delete(path, headers=world.auth("service"))
    assert ungated.status_code == 503
    assert "read-only" in ungated.json["message"]
    assert secret_exists(app, world)


@pytest.mark.skipif("PG_CTL" not in os.environ, reason="needs the throwaway cluster (make test)")
def test_restart_mid_load_fails_closed_and_recovers(app, client, world, live_server):
    """Agents keep calling while PostgreSQL restarts: 202/503 only, then service resumes."""
    statuses: Counter[int] = Counter()
    stop = threading.Event()
    lock = threading.Lock()
    path = f"{live_server.url}/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"

    def agent_loop() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                status = session.delete(path, headers=world.auth("agent"), timeout=10).status_code
            except requests.RequestException:
                status = -1
            with lock:
                statuses[status] += 1

    publisher = publisher_of(app)
    assert publisher.start_listening()
    subscription = publisher.hub.subscribe("test")
    workers = [threading.Thread(target=agent_loop) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        subprocess.run(
            [*shlex.split(os.environ["PG_CTL"]), "restart", "-m", "fast", "-w"],
            check=True,
            capture_output=True,
        )
        restarted_at = time.monotonic()
        # The service heals itself: pool_pre_ping replaces dead connections.
        recovered_after = None
        while time.monotonic() - restarted_at < 30:
            response = requests.delete(path, headers=world.auth("agent"), timeout=10)
            if response.status_code == 202:
                recovered_after = time.monotonic() - restarted_at
                break
        assert recovered_after is not None, "no 202 within 30 s of the restart"
        # The dashboards' event listener reconnects and tells subscribers to resync.
        change = subscription.get(timeout=30)
        while change is not None and change != RESYNC:
            change = subscription.get(timeout=30)
        assert change == RESYNC
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        subscription.close()
    print(
        f"\nstatuses during the restart: {dict(statuses)}; recovered {recovered_after:.2f}s after"
    )
    assert set(statuses) <= {202, 503}, statuses
    assert secret_exists(app, world)  # nothing ran without an approval
    with app.app_context():
        pending = db.session.execute(
            text("SELECT count(*) FROM approval_requests WHERE status = 'pending'")
        ).scalar_one()
        db.session.remove()
    assert pending == 1  # every retry reused the one pending row
