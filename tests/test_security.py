"""Hostile input and access: headers, throttling, secrets at rest, what an agent can never do."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from app.extensions import db
from tests.conftest import make_app, seed_world


def test_pages_and_api_carry_security_headers(client, world):
    for response in (
        client.get("/login"),
        client.get("/api/workspaces", headers=world.auth("service")),
        client.get("/api/openapi.json"),
    ):
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.fixture
def strict_app(app, migrated):
    """An app with a low failed-authentication limit (the `app` fixture emptied the database)."""
    strict = make_app(migrated, COUNTERSIGN_AUTH_FAILURE_LIMIT="3/minute")
    yield strict
    with strict.app_context():
        db.session.remove()
        db.engine.dispose()


def test_token_spraying_is_throttled_and_logged(strict_app, capsys):
    world = seed_world(strict_app)
    client = strict_app.test_client()
    guesses = [
        client.get("/api/workspaces", headers={"Authorization": f"Bearer cs_agent_guess{n}"})
        for n in range(4)
    ]
    assert [r.status_code for r in guesses] == [401, 401, 401, 429]
    assert guesses[-1].json["error"] == "too_many_requests"
    assert "Retry-After" in guesses[-1].headers
    # Successful calls never count towards the limit, but a throttled address is throttled.
    assert client.get("/api/workspaces", headers=world.auth("service")).status_code == 429
    assert '"throttled"' in capsys.readouterr().err


def test_valid_callers_are_not_throttled(strict_app):
    world = seed_world(strict_app)
    client = strict_app.test_client()
    statuses = {
        client.get("/api/workspaces", headers=world.auth("service")).status_code for _ in range(10)
    }
    assert statuses == {200}


def test_tokens_are_stored_only_as_hashes(app, world):
    with app.app_context():
        rows = db.session.execute(text("SELECT token_hash, prefix FROM api_tokens")).all()
    stored = " ".join(" ".join(row) for row in rows)
    for plaintext in world.tokens.values():
        assert plaintext not in stored
        assert hashlib.sha256(plaintext.encode()).hexdigest() in stored


def test_an_agent_never_sees_a_secret_value_or_a_token_plaintext(client, world):
    agent = world.auth("agent")
    listed = client.get(f"/api/workspaces/{world.ws['api']}/secrets", headers=agent)
    assert "hunter2" not in listed.get_data(as_text=True)
    minted = client.post(
        "/api/tokens",
        json={"kind": "agent", "name": "temp", "workspace_id": world.ws["api"]},
        headers=agent,
    )
    assert minted.status_code == 201
    plaintext = minted.json["token"]
    tokens = client.get("/api/tokens", headers=agent).get_data(as_text=True)
    assert plaintext not in tokens
    replaced = client.put(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD",
        json={"value": "new-value"},
        headers=agent,
    )
    assert replaced.status_code == 202
    detail = client.get(replaced.json["status_url"], headers=world.auth("alice")).get_data(
        as_text=True
    )
    assert "new-value" not in detail and "hunter2" not in detail


def test_an_agent_can_neither_approve_nor_withdraw_anothers_request(client, world):
    pending = client.delete(f"/api/workspaces/{world.ws['api']}", headers=world.auth("agent"))
    approval_id = pending.json["approval_id"]
    approve = client.post(
        f"/api/approvals/{approval_id}/decision",
        json={"decision": "approve", "reason": "me"},
        headers=world.auth("agent"),
    )
    assert approve.status_code == 403
    withdraw = client.post(f"/api/approvals/{approval_id}/withdraw", headers=world.auth("agent_y"))
    assert withdraw.status_code == 403
    # Nor can it mint itself a human's token to approve with.
    mint = client.post(
        "/api/tokens",
        json={"kind": "user", "name": "x", "user": "alice"},
        headers=world.auth("agent"),
    )
    assert mint.status_code == 403


def test_body_size_limit_is_enforced(client, world):
    response = client.put(
        f"/api/workspaces/{world.ws['api']}/secrets/BIG",
        data=b'{"value": "' + b"x" * (1024 * 1024 + 10) + b'"}',
        content_type="application/json",
        headers=world.auth("service"),
    )
    assert response.status_code == 413
    assert response.json["error"]
