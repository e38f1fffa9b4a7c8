"""The Alembic migrations build the schema from nothing and take it down again, on both engines."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import make_app
from flask_migrate import downgrade, upgrade
from psycopg import sql
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from app.extensions import db

TABLES = {
    "users",
    "workspaces",
    "api_tokens",
    "memberships",
    "secrets",
    "approval_requests",
    "approval_scopes",
    "approval_events",
}
PARTIAL_INDEXES = {
    "uq_approval_requests_pending_key": ("pending", True),
    "ix_approval_requests_approved_key": ("approved", False),
    "ix_approval_requests_denied_key": ("denied", False),
}


def admin_url() -> str:
    """The maintenance database of the test cluster, for CREATE/DROP DATABASE."""
    if os.environ.get("PG_ADMIN_URL"):
        return os.environ["PG_ADMIN_URL"]
    url = make_url(os.environ["TEST_DATABASE_URL"]).set(
        drivername="postgresql", database="postgres"
    )
    return url.render_as_string(hide_password=False)


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A brand-new, empty PostgreSQL database, dropped afterwards."""
    if not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("TEST_DATABASE_URL is not set")
    name = f"countersign_migrations_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(os.environ["TEST_DATABASE_URL"]).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'migrations.sqlite3'}"


def user_tables() -> set[str]:
    return set(inspect(db.engine).get_table_names()) - {"alembic_version"}


def partial_index_definitions() -> dict[str, str]:
    """Index name -> its full definition, as the database itself reports it."""
    if db.engine.dialect.name == "postgresql":
        rows = db.session.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'approval_requests'")
        )
    else:
        rows = db.session.execute(
            text(
                "SELECT name, sql FROM sqlite_master "
                "WHERE type = 'index' AND tbl_name = 'approval_requests'"
            )
        )
    return {name: definition or "" for name, definition in rows}


def check_round_trip(url: str) -> None:
    app = make_app(url)
    try:
        with app.app_context():
            assert user_tables() == set()
            upgrade()
            assert user_tables() >= TABLES

            definitions = partial_index_definitions()
            for name, (status, unique) in PARTIAL_INDEXES.items():
                definition = " ".join(definitions[name].split())
                assert definition.upper().startswith("CREATE UNIQUE" if unique else "CREATE INDEX")
                assert "WHERE" in definition.upper()
                assert f"'{status}'" in definition, definition
                assert "status" in definition.split("WHERE", 1)[1]

            # The migrated schema is the models' schema: autogenerate finds nothing to add.
            with db.engine.connect() as connection:
                differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
            assert differences == []

            downgrade(revision="base")
            db.session.remove()
            assert user_tables() == set()
            version = db.session.execute(text("SELECT count(*) FROM alembic_version")).scalar()
            assert version == 0
            db.session.remove()
    finally:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
        app.extensions["countersign_events"].stop()


@pytest.mark.postgres_only
def test_migrations_round_trip_on_empty_postgres(empty_postgres):
    check_round_trip(empty_postgres)


def test_migrations_round_trip_on_empty_sqlite(empty_sqlite):
    check_round_trip(empty_sqlite)


def test_pending_index_rejects_a_second_pending_row(empty_sqlite):
    """The dedup the gate relies on is enforced by the database, not by the code."""
    app = make_app(empty_sqlite)
    try:
        with app.app_context():
            upgrade()
            insert = text(
                "INSERT INTO approval_requests (workspace_id, action, request_hash, summary,"
                " context, workspace_path, requested_by_kind, requested_by_name, status,"
                " created_at, expires_at) VALUES (1, 'workspace.delete', 'h', 's', '{}', '[]',"
                " 'agent', 'a', :status, '2030-01-01', '2030-01-02')"
            )
            db.session.execute(insert, {"status": "pending"})
            db.session.execute(insert, {"status": "approved"})  # other statuses may repeat
            db.session.execute(insert, {"status": "approved"})
            db.session.commit()
            with pytest.raises(IntegrityError):
                db.session.execute(insert, {"status": "pending"})
            db.session.rollback()
    finally:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
        app.extensions["countersign_events"].stop()
