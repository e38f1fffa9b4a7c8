"""The event log as a hash chain: every edit, removal or fork is caught and named."""

from __future__ import annotations

import itertools
import json
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import psycopg
import pytest
from conftest import engine_name, make_app
from depth_support import add_secrets, decide, events, pending_id, secret_url
from flask import Flask
from flask_migrate import downgrade, upgrade
from psycopg import sql
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from app import audit
from app.extensions import db
from app.models import ApprovalEvent

pytestmark = pytest.mark.gate


def a_full_cycle(client, world) -> int:
    url = secret_url(world)
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    decide(client, world, approval_id, "carol")
    assert client.delete(url, headers=world.auth("agent")).status_code == 204
    pending_id(client.delete(f"/api/workspaces/{world.ws['staging']}", headers=world.auth("agent")))
    return approval_id


def sql_update(app: Flask, statement: str, **params) -> None:
    with app.app_context():
        db.session.execute(text(statement), params)
        db.session.commit()


def verify(app: Flask) -> audit.ChainStatus:
    with app.app_context():
        return audit.verify()


def test_every_event_links_to_the_one_before(app, client, world):
    a_full_cycle(client, world)
    chain = events(app)
    assert [e.kind for e in chain] == ["created", "approved", "consumed", "created"]
    assert chain[0].prev_hash == audit.GENESIS
    for before, after in itertools.pairwise(chain):
        assert after.prev_hash == before.hash
    status = verify(app)
    assert (status.ok, status.events, status.head) == (True, 4, chain[-1].hash)


def test_audit_verify_passes_on_an_intact_chain(app, client, world, runner):
    a_full_cycle(client, world)
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "audit chain intact: 4 event(s)" in result.output


def test_an_empty_log_verifies(app, runner):
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0
    assert "0 event(s)" in result.output


def test_editing_an_event_in_the_database_is_caught_and_named(app, client, world, runner):
    a_full_cycle(client, world)
    approved = events(app, "approved")[0]
    detail = json.dumps({**approved.detail, "reason": "looked fine to me"})
    sql_update(
        app, "UPDATE approval_events SET detail = :d WHERE id = :id", d=detail, id=approved.id
    )

    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 1
    assert f"audit chain broken at event {approved.id}" in result.output
    assert "content does not match its hash" in result.output
    status = verify(app)
    assert (status.ok, status.broken_event_id, status.events) == (False, approved.id, 1)


@pytest.mark.parametrize(
    "column", ["actor", "kind", "approval_id", "created_at"], ids=lambda c: f"edit-{c}"
)
def test_any_covered_column_counts(app, client, world, column):
    a_full_cycle(client, world)
    target = events(app)[2]
    values = {
        "actor": "user:mallory",
        "kind": "withdrawn",
        "approval_id": events(app)[-1].approval_id,
        "created_at": datetime(2020, 1, 1, tzinfo=UTC),
    }
    with app.app_context():
        db.session.execute(
            ApprovalEvent.__table__.update()
            .where(ApprovalEvent.id == target.id)
            .values({column: values[column]})
        )
        db.session.commit()
    assert verify(app).broken_event_id == target.id


def test_rewriting_the_hash_too_breaks_the_next_link(app, client, world):
    a_full_cycle(client, world)
    first, second = events(app)[:2]
    sql_update(
        app,
        "UPDATE approval_events SET actor = 'user:mallory', hash = :h WHERE id = :id",
        h="f" * 64,
        id=first.id,
    )
    status = verify(app)
    assert status.broken_event_id == first.id  # its own hash no longer matches its content
    forged = audit.event_hash(
        first.prev_hash,
        audit.canonical_content(
            first.approval_id, first.kind, "user:mallory", first.detail, first.created_at
        ),
    )
    sql_update(app, "UPDATE approval_events SET hash = :h WHERE id = :id", h=forged, id=first.id)
    status = verify(app)
    assert status.broken_event_id == second.id
    assert f"hash of event {first.id}" in status.problem


def test_removing_an_event_breaks_the_chain_after_it(app, client, world):
    a_full_cycle(client, world)
    chain = events(app)
    sql_update(app, "DELETE FROM approval_events WHERE id = :id", id=chain[1].id)
    assert verify(app).broken_event_id == chain[2].id


def test_the_database_refuses_a_fork(app, client, world):
    a_full_cycle(client, world)
    first = events(app)[0]
    with app.app_context(), pytest.raises(IntegrityError):
        db.session.add(
            ApprovalEvent(
                approval_id=first.approval_id,
                kind="approved",
                actor="user:mallory",
                detail={},
                prev_hash=first.prev_hash,
                hash="0" * 64,
            )
        )
        db.session.commit()


def test_audit_export_writes_json_lines_that_verify(app, client, world, runner, tmp_path):
    a_full_cycle(client, world)
    result = runner.invoke(args=["audit", "export"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["kind"] for line in lines] == ["created", "approved", "consumed", "created"]
    assert lines[0]["prev_hash"] == audit.GENESIS
    rows = [
        SimpleNamespace(**{**line, "created_at": datetime.fromisoformat(line["created_at"])})
        for line in lines
    ]
    assert audit.verify_rows(rows).ok  # an export can be checked offline, without the database

    out = tmp_path / "events.jsonl"
    result = runner.invoke(args=["audit", "export", "--output", str(out)])
    assert result.exit_code == 0
    assert "exported 4 event(s)" in result.output
    assert len(out.read_text().splitlines()) == 4


def test_verify_reads_in_batches(app, client, world):
    add_secrets(client, world, [f"S{i}" for i in range(5)])
    for i in range(5):
        pending_id(client.delete(secret_url(world, f"S{i}"), headers=world.auth("agent")))
    with app.app_context():
        assert audit.verify(batch_size=2).events == 5


@pytest.mark.postgres_only
def test_concurrent_appends_never_fork_the_chain(app, client, world):
    """Twelve agents asking at once: the advisory lock lines their events up one by one."""
    names = [f"S{i}" for i in range(12)]
    add_secrets(client, world, names)
    barrier = threading.Barrier(len(names))
    statuses: list[int] = []

    def ask(name: str) -> None:
        local = app.test_client()
        barrier.wait(timeout=30)
        statuses.append(
            local.delete(secret_url(world, name), headers=world.auth("agent")).status_code
        )

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [202] * len(names)
    status = verify(app)
    assert (status.ok, status.events) == (True, len(names))
    with app.app_context():
        prev = list(db.session.execute(select(ApprovalEvent.prev_hash)).scalars())
    assert len(set(prev)) == len(prev)


# ---- the migration chains events recorded before it --------------------------------------------


@pytest.fixture
def fresh_database_url(tmp_path) -> Iterator[str]:
    """An empty database of the engine under test, dropped afterwards."""
    if engine_name() == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit-migration.sqlite3'}"
        return
    admin = os.environ.get("PG_ADMIN_URL") or make_url(os.environ["TEST_DATABASE_URL"]).set(
        drivername="postgresql", database="postgres"
    ).render_as_string(hide_password=False)
    name = f"countersign_audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(os.environ["TEST_DATABASE_URL"])
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_upgrading_chains_the_events_already_recorded_and_downgrading_keeps_them(
    fresh_database_url,
):
    old = make_app(fresh_database_url)
    try:
        with old.app_context():
            upgrade(revision="0002")
            db.session.execute(
                text(
                    "INSERT INTO approval_requests (id, workspace_id, action, request_hash,"
                    " summary, context, workspace_path, requested_by_kind, requested_by_name,"
                    " status, created_at, expires_at) VALUES (1, 1, 'secret.delete', 'h', 's',"
                    " '{}', '[]', 'agent', 'a', 'consumed', :t, :t)"
                ),
                {"t": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)},
            )
            for i, kind in enumerate(("created", "approved", "consumed")):
                db.session.execute(
                    text(
                        "INSERT INTO approval_events (approval_id, kind, actor, detail, created_at)"
                        " VALUES (1, :kind, 'user:alice', :detail, :t)"
                    ),
                    {
                        "kind": kind,
                        "detail": json.dumps({"level": i, "reason": "Zürich"}),
                        "t": datetime(2026, 1, 2, 3, 4, 5 + i, 10 * i, tzinfo=UTC),
                    },
                )
            db.session.commit()
            upgrade()
            status = audit.verify()
            assert (status.ok, status.events) == (True, 3), status.message
            # And the app's appends continue the migrated chain.
            audit.append(1, "expired", "system", {})
            db.session.commit()
            assert audit.verify().events == 4
            assert audit.verify().ok
            db.session.remove()

            # Down again: the rows survive (on SQLite no table copy cascades them away).
            downgrade(revision="0002")
            kept = db.session.execute(
                text(
                    "SELECT (SELECT count(*) FROM approval_requests),"
                    " (SELECT count(*) FROM approval_events)"
                )
            ).one()
            assert tuple(kept) == (1, 4)
    finally:
        with old.app_context():
            db.session.remove()
            db.engine.dispose()
        old.extensions["countersign_events"].stop()
