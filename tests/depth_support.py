"""Helpers shared by the policy-depth tests: apps under a policy file, a real webhook receiver."""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import World, make_app
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.extensions import db
from app.models import ApprovalEvent, ApprovalRequest, OutboxMessage


class PolicyApps:
    """Apps on the test database configured with a policy file; disposed at teardown."""

    def __init__(self, database_url: str, directory: Path) -> None:
        self.database_url = database_url
        self.directory = directory
        self.apps: list[Flask] = []

    def build(self, policy: str | None = None, **config: Any) -> Flask:
        if policy is not None:
            path = self.directory / f"policy-{len(self.apps)}.toml"
            path.write_text(policy)
            config["COUNTERSIGN_POLICY"] = str(path)
        app = make_app(self.database_url, **config)
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            app.extensions["countersign_events"].stop()


# ---- the API, briefly --------------------------------------------------------------------------


def secret_url(world: World, name: str = "DB_PASSWORD", workspace: str = "api") -> str:
    return f"/api/workspaces/{world.ws[workspace]}/secrets/{name}"


def pending_id(response) -> int:
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["approval_id"]


def decide(
    client: FlaskClient,
    world: World,
    approval_id: int,
    who: str,
    decision: str = "approve",
    reason: str | None = None,
):
    body: dict[str, Any] = {"decision": decision}
    if reason is not None:
        body["reason"] = reason
    return client.post(f"/api/approvals/{approval_id}/decision", json=body, headers=world.auth(who))


def read(client: FlaskClient, world: World, approval_id: int) -> dict[str, Any]:
    response = client.get(f"/api/approvals/{approval_id}", headers=world.auth("alice"))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def add_member(client: FlaskClient, world: World, workspace: str, username: str, role: str):
    response = client.put(
        f"/api/workspaces/{world.ws[workspace]}/members/{username}",
        json={"role": role},
        headers=world.auth("service"),
    )
    assert response.status_code in (200, 201), response.get_data(as_text=True)


def add_secrets(client: FlaskClient, world: World, names: list[str], workspace: str = "api"):
    for name in names:
        response = client.put(
            secret_url(world, name, workspace), json={"value": "v"}, headers=world.auth("service")
        )
        assert response.status_code == 201, response.get_data(as_text=True)


# ---- the database, directly (moving time instead of waiting) ----------------------------------


def set_request(app: Flask, approval_id: int, **values: Any) -> None:
    with app.app_context():
        db.session.execute(
            update(ApprovalRequest).where(ApprovalRequest.id == approval_id).values(**values)
        )
        db.session.commit()


def set_messages(app: Flask, **values: Any) -> None:
    with app.app_context():
        db.session.execute(update(OutboxMessage).values(**values))
        db.session.commit()


def messages(app: Flask) -> list[OutboxMessage]:
    with app.app_context():
        rows = list(db.session.execute(select(OutboxMessage).order_by(OutboxMessage.id)).scalars())
        db.session.expunge_all()
        return rows


def events(app: Flask, kind: str | None = None) -> list[ApprovalEvent]:
    with app.app_context():
        query = select(ApprovalEvent).order_by(ApprovalEvent.id)
        if kind is not None:
            query = query.where(ApprovalEvent.kind == kind)
        rows = list(db.session.execute(query).scalars())
        db.session.expunge_all()
        return rows


# ---- a real webhook receiver -------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 in a thread, recording every POST; ``status`` is its answer.

    ``stop()`` closes the port (connections are refused: the receiver is down); ``Receiver(port)``
    brings one back on the same port.
    """

    def __init__(self, port: int = 0, status: int = 204) -> None:
        self.status = status
        self.inbox: queue.Queue[Received] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.inbox.put(Received(dict(self.headers.items()), body))
                self.send_response(receiver.status)
                if 300 <= receiver.status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def received(self) -> list[Received]:
        """Everything received so far (each POST was answered before the worker moved on)."""
        got = []
        while True:
            try:
                got.append(self.inbox.get_nowait())
            except queue.Empty:
                return got
