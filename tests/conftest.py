"""Fixtures: a real database (PostgreSQL by default), a fresh schema per test, a seeded world.

The engine comes from the environment:
- TEST_DATABASE_URL: a PostgreSQL database (`make test` starts a throwaway cluster);
- COUNTERSIGN_TEST_ENGINE=sqlite: a temporary SQLite file instead (the gate runs on both).
The schema is built once per session by the Alembic migrations, then emptied between tests.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask_migrate import upgrade
from sqlalchemy import text
from werkzeug.serving import make_server

from app import create_app
from app.auth import hash_password, issue_token
from app.extensions import db
from app.models import Membership, Secret, User, Workspace

TABLES = [
    "outbox_attempts",
    "outbox_messages",
    "webhooks",
    "approval_votes",
    "approval_events",
    "approval_scopes",
    "approval_requests",
    "secrets",
    "memberships",
    "api_tokens",
    "workspaces",
    "users",
]


def engine_name() -> str:
    return "sqlite" if os.environ.get("COUNTERSIGN_TEST_ENGINE") == "sqlite" else "postgresql"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    if engine_name() == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.sqlite3'}"
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.exit("TEST_DATABASE_URL is not set: run the suite with `make test`", returncode=2)
    return url


def make_app(database_url: str, **overrides: Any) -> Flask:
    config = {
        "TESTING": True,
        "SECRET_KEY": "test-secret-key",
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True, "pool_size": 40, "max_overflow": 40}
        if database_url.startswith("postgres")
        else {},
        "COUNTERSIGN_RETRY_AFTER": 1,
        # Tests send many bad tokens from one address on purpose; throttling has its own test.
        "COUNTERSIGN_AUTH_FAILURE_LIMIT": "100000/minute",
        "COUNTERSIGN_LOGIN_LIMIT": "100000/minute",
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture(scope="session")
def migrated(database_url: str) -> str:
    """Build the schema once, through the migrations (the only way the schema changes)."""
    app = make_app(database_url)
    with app.app_context():
        upgrade()
        db.engine.dispose()
    return database_url


def empty_database() -> None:
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    else:
        for table in TABLES:
            db.session.execute(text(f"DELETE FROM {table}"))
    db.session.commit()


@pytest.fixture
def app(migrated: str) -> Iterator[Flask]:
    app = make_app(migrated)
    with app.app_context():
        empty_database()
    yield app
    with app.app_context():
        db.session.remove()
        release_connections()
    app.extensions["countersign_events"].stop()


def release_connections(grace: float = 10.0) -> None:
    """Close the pool once server threads that outlive a test have given their connections back.

    dispose() leaves checked-out connections alone; one a live server's handler thread returns
    later would be dropped unclosed (a ResourceWarning, an error here).
    """
    deadline = time.monotonic() + grace
    while db.engine.pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.05)  # teardown only: waiting for other threads to finish their request
    db.engine.dispose()


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def runner(app: Flask):
    return app.test_cli_runner()


@dataclass
class World:
    """A seeded tree and its people; ids, usernames and bearer headers by role.

    acme (root) ─ prod ─ api         owner: alice on acme
               └ staging             approver: carol on api, dave on staging; viewer: victor on api
    """

    ws: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # name -> plaintext
    token_ids: dict[str, int] = field(default_factory=dict)
    password: str = "correct horse battery staple"

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}


@functools.cache
def password_hash(password: str) -> str:
    """scrypt is slow on purpose; hash the shared test password once per session."""
    return hash_password(password)


def seed_world(app: Flask) -> World:
    world = World()
    with app.app_context():
        acme = Workspace(name="acme")
        db.session.add(acme)
        db.session.flush()
        prod = Workspace(name="prod", parent_id=acme.id)
        staging = Workspace(name="staging", parent_id=acme.id)
        db.session.add_all([prod, staging])
        db.session.flush()
        api = Workspace(name="api", parent_id=prod.id)
        db.session.add(api)
        db.session.flush()
        world.ws = {"acme": acme.id, "prod": prod.id, "staging": staging.id, "api": api.id}
        people = {}
        for name in ("alice", "carol", "dave", "victor", "mallory"):
            people[name] = User(username=name, password_hash=password_hash(world.password))
        db.session.add_all(people.values())
        db.session.flush()
        db.session.add_all(
            [
                Membership(workspace_id=acme.id, user_id=people["alice"].id, role="owner"),
                Membership(workspace_id=api.id, user_id=people["carol"].id, role="approver"),
                Membership(workspace_id=staging.id, user_id=people["dave"].id, role="approver"),
                Membership(workspace_id=api.id, user_id=people["victor"].id, role="viewer"),
            ]
        )
        db.session.add(Secret(workspace_id=api.id, name="DB_PASSWORD", value="hunter2"))
        specs = {
            "agent": ("agent", None, None),
            "agent_y": ("agent", None, None),
            "agent_staging": ("agent", None, staging.id),
            "service": ("service", None, None),
            **{name: ("user", people[name], None) for name in people},
        }
        for name, (kind, user, workspace_id) in specs.items():
            token, plaintext = issue_token(kind, name, user=user, workspace_id=workspace_id)
            db.session.flush()
            world.tokens[name] = plaintext
            world.token_ids[name] = token.id
        db.session.commit()
    return world


@pytest.fixture
def world(app: Flask) -> World:
    return seed_world(app)


@pytest.fixture
def policy_apps(app: Flask, tmp_path):
    """Builds apps on the test database under a policy file; disposes them at teardown."""
    from depth_support import PolicyApps  # imports this module: import it late

    apps = PolicyApps(app.config["SQLALCHEMY_DATABASE_URI"], tmp_path)
    yield apps
    apps.close()


class LiveServer:
    """The app served over real HTTP by werkzeug's threaded server, in a background thread."""

    def __init__(self, app: Flask) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server
