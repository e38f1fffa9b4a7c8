"""A worker process killed in the middle of a delivery: the notification still arrives, once."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.extensions import db
from app.models import OutboxMessage, utcnow

ROOT = Path(__file__).resolve().parents[1]


class StallingReceiver:
    """Takes the first delivery and stalls on it (the worker dies meanwhile); answers 204 after."""

    def __init__(self) -> None:
        self.delivery_ids: list[str] = []
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.delivery_ids.append(self.headers["X-Countersign-Delivery"])
                if len(receiver.delivery_ids) == 1:
                    receiver.first_arrived.set()
                    receiver.release.wait(30)
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:  # the worker that asked is dead
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[StallingReceiver]:
    server = StallingReceiver()
    yield server
    server.stop()


def message_states(app) -> list[tuple[str, int]]:
    with app.app_context():
        rows = db.session.execute(select(OutboxMessage.status, OutboxMessage.attempts)).all()
        db.session.remove()
    return [tuple(row) for row in rows]


@pytest.mark.postgres_only
def test_killed_worker_mid_delivery_is_delivered_later_once(app, client, world, migrated, receiver):
    hook = client.post(
        f"/api/workspaces/{world.ws['acme']}/webhooks",
        json={"url": receiver.url, "events": ["created"]},
        headers=world.auth("alice"),
    )
    assert hook.status_code == 201
    created = client.delete(f"/api/workspaces/{world.ws['api']}", headers=world.auth("agent"))
    assert created.status_code == 202

    env = {
        **os.environ,
        "DATABASE_URL": migrated,
        "SECRET_KEY": "test-secret-key",
        "COUNTERSIGN_WEBHOOK_TIMEOUT": "30",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", "worker", "--interval", "0.2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert receiver.first_arrived.wait(30), "the worker never delivered"
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.kill()
    receiver.release.set()
    # The dead worker's claim is still leased: nobody else touches the message until it lapses.
    assert [status for status, _ in message_states(app)] == ["pending"]
    with app.app_context():
        db.session.execute(
            update(OutboxMessage).values(lease_until=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
        db.session.remove()

    result = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    assert "delivered 1 notification(s)" in result.output
    assert [status for status, _ in message_states(app)] == ["delivered"]
    again = app.test_cli_runner().invoke(args=["worker", "--once"])
    assert "delivered" not in again.output
    # The receiver saw the same delivery id twice (the first reply never reached the dead
    # worker): it de-duplicates on X-Countersign-Delivery, so the notification counts once.
    assert len(receiver.delivery_ids) == 2
    assert len(set(receiver.delivery_ids)) == 1
