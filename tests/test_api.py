"""The JSON API around the gate: its structure, authentication, input handling and secrecy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import conftest
import pytest
from conftest import engine_name, make_app
from flask import Flask
from sqlalchemy import func, select
from werkzeug.security import generate_password_hash

from app.extensions import db
from app.gate import gate_destructive
from app.models import ApprovalEvent, ApprovalRequest, Secret, Workspace
from app.policy import POLICY, UnknownActionError, keyed_digest, request_hash


@pytest.fixture(autouse=True)
def cheap_seed_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here logs in with a password: hash the seeded users' cheaply to keep setup fast."""
    monkeypatch.setattr(
        conftest, "hash_password", lambda pw: generate_password_hash(pw, "pbkdf2:sha256:1000")
    )


# ---- structure: every destructive route carries the gate --------------------------------------

EXPECTED_GATES = {
    ("DELETE", "/api/workspaces/<id:workspace_id>"): "workspace.delete",
    ("DELETE", "/api/workspaces/<id:workspace_id>/secrets/<name>"): "secret.delete",
    ("PUT", "/api/workspaces/<id:workspace_id>/secrets/<name>"): "secret.replace",
    ("POST", "/api/tokens"): "token.mint",
    ("DELETE", "/api/tokens/<id:token_id>"): "token.revoke",
    ("DELETE", "/api/workspaces/<id:workspace_id>/members/<username>"): "member.remove",
}


def gated_routes(app: Flask) -> dict[tuple[str, str], str | None]:
    """(method, rule) -> gate action (or None) for every route under /api."""
    found = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api"):
            continue
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found[(method, rule.rule)] = getattr(view, "gate_action", None)
    return found


def gate_problems(app: Flask) -> list[str]:
    """What the structural rule finds wrong: ungated DELETEs, gates naming unknown actions."""
    problems = []
    for rule in app.url_map.iter_rules():
        action = getattr(app.view_functions[rule.endpoint], "gate_action", None)
        if action is not None and action not in POLICY:
            problems.append(f"{rule.rule} names unknown action {action!r}")
        exempt = getattr(app.view_functions[rule.endpoint], "gate_exempt", None)  # @not_gated
        if (
            rule.rule.startswith("/api")
            and "DELETE" in (rule.methods or ())
            and action is None
            and not exempt
        ):
            problems.append(f"DELETE {rule.rule} has no gate")
    return problems


def test_every_destructive_route_is_gated(app):
    assert gate_problems(app) == []
    routes = gated_routes(app)
    assert {key: routes.get(key) for key in EXPECTED_GATES} == EXPECTED_GATES
    assert {action for action in routes.values() if action} == set(POLICY)


@pytest.fixture
def bare_app() -> Iterator[Flask]:
    """An app that never touches a database, for adding test-only routes."""
    built = make_app("sqlite://")
    yield built
    built.extensions["countersign_events"].stop()


def test_structural_check_catches_an_ungated_delete(bare_app):
    before = gate_problems(bare_app)
    bare_app.add_url_rule(
        "/api/things/<id:thing_id>",
        "delete_thing",
        lambda thing_id: ("", 204),
        methods=["DELETE"],
    )

    def sneaky(**_: Any):
        return "", 204

    sneaky.gate_action = "thing.vanish"  # type: ignore[attr-defined]
    bare_app.add_url_rule("/api/sneaky", "sneaky", sneaky, methods=["POST"])
    assert gate_problems(bare_app)[len(before) :] == [
        "DELETE /api/things/<id:thing_id> has no gate",
        "/api/sneaky names unknown action 'thing.vanish'",
    ]


def test_unknown_action_fails_when_the_route_is_declared():
    with pytest.raises(UnknownActionError, match=r"not\.an\.action"):

        @gate_destructive("not.an.action", describe=lambda **_: None)
        def view():  # pragma: no cover - never reached
            return "", 204


def test_gate_keeps_the_view_name_and_docstring(app):
    view = app.view_functions["api.delete_workspace"]
    assert view.__name__ == "delete_workspace"
    assert view.__doc__
    assert view.gate_action == "workspace.delete"


# ---- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "bearer cs_agent_lowercase_scheme",
        "Bearer not-a-token",
        "Bearer cs_agent_" + "x" * 43,
        "Bearer " + "x" * 500,
    ],
    ids=lambda h: repr(h)[:24],
)
def test_missing_malformed_or_unknown_tokens_get_401(app, client, world, header):
    headers = {"Authorization": header} if header is not None else {}
    for method, url in (
        ("GET", "/api/workspaces"),
        ("DELETE", f"/api/workspaces/{world.ws['api']}"),
    ):
        response = client.open(url, method=method, headers=headers)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
        assert response.get_json()["message"]
    assert count(app, Workspace, Workspace.id == world.ws["api"]) == 1


def test_revoked_token_gets_401(app, client, world):
    assert client.get("/api/workspaces", headers=world.auth("agent")).status_code == 200
    revoke = client.delete(f"/api/tokens/{world.token_ids['agent']}", headers=world.auth("service"))
    assert revoke.status_code == 204  # service tokens are not gated
    assert count(app, ApprovalRequest) == 0
    for method, url in (
        ("GET", "/api/workspaces"),
        ("DELETE", f"/api/workspaces/{world.ws['api']}"),
    ):
        response = client.open(url, method=method, headers=world.auth("agent"))
        assert response.status_code == 401
    again = client.delete(f"/api/tokens/{world.token_ids['agent']}", headers=world.auth("service"))
    assert again.status_code == 409
    assert again.get_json()["error"] == "already_revoked"


def test_token_listing_never_shows_secrets(client, world):
    response = client.get("/api/tokens", headers=world.auth("service"))
    assert response.status_code == 200
    raw = response.get_data(as_text=True)
    for plaintext in world.tokens.values():
        assert plaintext not in raw
    assert "token_hash" not in raw
    assert {t["name"] for t in response.get_json()["tokens"]} >= {"agent", "agent_y", "service"}


# ---- input: bad bodies, bad ids, never a 500 ---------------------------------------------------

# (label, who, method, path, request kwargs, status, field)
BAD_REQUESTS: list[tuple[str, str, str, str, dict[str, Any], int, str | None]] = [
    ("json-truncated", "service", "POST", "/api/workspaces", {"data": "{"}, 400, None),
    ("json-null", "service", "POST", "/api/workspaces", {"data": "null"}, 400, None),
    ("json-deep", "service", "POST", "/api/workspaces", {"data": "[" * 100_000}, 400, None),
    ("json-bad-utf8", "service", "POST", "/api/workspaces", {"data": b"\xff\xfe{"}, 400, None),
    ("not-json", "service", "POST", "/api/workspaces", {"data": {"name": "x"}}, 400, None),
    ("no-body", "service", "POST", "/api/workspaces", {}, 400, None),
    ("array-body", "service", "POST", "/api/workspaces", {"json": []}, 422, "body"),
    ("name-int", "service", "POST", "/api/workspaces", {"json": {"name": 5}}, 422, "name"),
    ("name-blank", "service", "POST", "/api/workspaces", {"json": {"name": "  "}}, 422, "name"),
    ("name-long", "service", "POST", "/api/workspaces", {"json": {"name": "x" * 129}}, 422, "name"),
    ("name-missing", "service", "POST", "/api/workspaces", {"json": {}}, 422, "name"),
    (
        "parent-str",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "parent_id": "2"}},
        422,
        "parent_id",
    ),
    (
        "parent-bool",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "parent_id": True}},
        422,
        "parent_id",
    ),
    (
        "parent-zero",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "parent_id": 0}},
        422,
        "parent_id",
    ),
    (
        "parent-huge",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "parent_id": 2**40}},
        422,
        "parent_id",
    ),
    (
        "unknown-field",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "colour": "red"}},
        422,
        "colour",
    ),
    (
        "parent-unknown",
        "service",
        "POST",
        "/api/workspaces",
        {"json": {"name": "x", "parent_id": 99999}},
        404,
        None,
    ),
    ("nul-name", "service", "POST", "/api/workspaces", {"json": {"name": "a\x00b"}}, 400, None),
    (
        "secret-int",
        "agent",
        "PUT",
        "{api}/secrets/DB_PASSWORD",
        {"json": {"value": 1}},
        422,
        "value",
    ),
    (
        "secret-empty",
        "agent",
        "PUT",
        "{api}/secrets/DB_PASSWORD",
        {"json": {"value": ""}},
        422,
        "value",
    ),
    (
        "secret-extra",
        "agent",
        "PUT",
        "{api}/secrets/DB_PASSWORD",
        {"json": {"value": "x", "ttl": 5}},
        422,
        "ttl",
    ),
    (
        "secret-badname",
        "agent",
        "PUT",
        "{api}/secrets/bad name",
        {"json": {"value": "x"}},
        422,
        "name",
    ),
    ("secret-nul", "service", "PUT", "{api}/secrets/NEW", {"json": {"value": "a\x00"}}, 400, None),
    ("secret-unknown", "agent", "DELETE", "{api}/secrets/NOPE", {}, 404, None),
    (
        "token-kind",
        "service",
        "POST",
        "/api/tokens",
        {"json": {"kind": "root", "name": "x"}},
        422,
        "kind",
    ),
    ("token-noname", "service", "POST", "/api/tokens", {"json": {"kind": "agent"}}, 422, "name"),
    (
        "token-nouser",
        "service",
        "POST",
        "/api/tokens",
        {"json": {"kind": "user", "name": "u"}},
        422,
        "user",
    ),
    (
        "token-ws-str",
        "agent",
        "POST",
        "/api/tokens",
        {"json": {"kind": "service", "name": "s", "workspace_id": "1"}},
        422,
        "workspace_id",
    ),
    (
        "role-unknown",
        "service",
        "PUT",
        "{api}/members/victor",
        {"json": {"role": "god"}},
        422,
        "role",
    ),
    (
        "member-unknown",
        "service",
        "PUT",
        "{api}/members/nobody",
        {"json": {"role": "viewer"}},
        404,
        None,
    ),
    ("member-nul", "agent", "DELETE", "{api}/members/a%00b", {}, 400, None),
    ("recursive-flag", "agent", "DELETE", "{api}?recursive=maybe", {}, 400, "recursive"),
    ("status-filter", "alice", "GET", "/api/approvals?status=bogus", {}, 400, "status"),
    ("limit-zero", "alice", "GET", "/api/approvals?limit=0", {}, 400, "limit"),
    ("limit-text", "alice", "GET", "/api/approvals?limit=ten", {}, 400, "limit"),
    ("ws-filter", "alice", "GET", "/api/approvals?workspace_id=-1", {}, 400, "workspace_id"),
    ("ws-abc", "service", "GET", "/api/workspaces/abc", {}, 404, None),
    ("ws-zero", "service", "GET", "/api/workspaces/0", {}, 404, None),
    ("ws-negative", "service", "GET", "/api/workspaces/-1", {}, 404, None),
    ("ws-huge", "service", "GET", "/api/workspaces/99999999999999999", {}, 404, None),
    ("ws-int32", "service", "GET", "/api/workspaces/2147483648", {}, 404, None),
    ("ws-unknown", "service", "GET", "/api/workspaces/99999", {}, 404, None),
    ("del-abc", "agent", "DELETE", "/api/workspaces/abc", {}, 404, None),
    ("del-zero", "agent", "DELETE", "/api/workspaces/0", {}, 404, None),
    ("del-huge", "agent", "DELETE", "/api/workspaces/99999999999999999", {}, 404, None),
    ("del-int32", "agent", "DELETE", "/api/workspaces/2147483648", {}, 404, None),
    ("del-max", "agent", "DELETE", "/api/workspaces/2147483647", {}, 404, None),
    ("del-leading-zero", "agent", "DELETE", "/api/workspaces/007", {}, 404, None),
    ("del-unknown", "agent", "DELETE", "/api/workspaces/99999", {}, 404, None),
    ("token-del-zero", "agent", "DELETE", "/api/tokens/0", {}, 404, None),
    ("token-del-unknown", "agent", "DELETE", "/api/tokens/99999", {}, 404, None),
    ("approval-abc", "alice", "GET", "/api/approvals/abc", {}, 404, None),
    ("approval-huge", "alice", "GET", "/api/approvals/99999999999999999", {}, 404, None),
    ("approval-unknown", "alice", "GET", "/api/approvals/99999", {}, 404, None),
    ("no-route", "service", "GET", "/api/nothing-here", {}, 404, None),
    ("bad-method", "service", "PATCH", "{api}", {"json": {"name": "y"}}, 405, None),
]


def count(app: Flask, model: type, *where: Any) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(model).where(*where)).scalar()


# PostgreSQL text cannot hold NUL; SQLite stores it, so there these are valid requests.
ONLY_ON_POSTGRES = {"nul-name", "secret-nul", "member-nul"}
POSTGRES_ONLY = [
    pytest.mark.postgres_only,
    pytest.mark.skipif(engine_name() == "sqlite", reason="PostgreSQL rejects NUL in text"),
]


@pytest.mark.parametrize(
    ("who", "method", "path", "kwargs", "status", "field"),
    [
        pytest.param(
            *case[1:], id=case[0], marks=POSTGRES_ONLY if case[0] in ONLY_ON_POSTGRES else ()
        )
        for case in BAD_REQUESTS
    ],
)
def test_bad_input_gets_a_json_error_never_a_500(
    app, client, world, who, method, path, kwargs, status, field
):
    url = path.replace("{api}", f"/api/workspaces/{world.ws['api']}")
    if isinstance(kwargs.get("data"), str | bytes):
        kwargs = {**kwargs, "content_type": "application/json"}
    response = client.open(url, method=method, headers=world.auth(who), **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["error"], str)
    assert isinstance(body["message"], str)
    assert body["message"]
    if field is not None:
        assert body["field"] == field
    assert count(app, ApprovalRequest) == 0  # nothing invalid reaches a human
    assert count(app, Workspace) == 4
    assert count(app, Secret) == 1


def test_validation_error_lists_every_field(client, world):
    response = client.post(
        "/api/workspaces",
        json={"name": 5, "parent_id": "x", "extra": True},
        headers=world.auth("service"),
    )
    assert response.status_code == 422
    body = response.get_json()
    assert {d["field"] for d in body["details"]} == {"name", "parent_id", "extra"}
    assert body["field"] in {"name", "parent_id", "extra"}


def test_body_over_the_limit_gets_413_json(app, client, world):
    assert app.config["MAX_CONTENT_LENGTH"] == 1024 * 1024
    oversized = json.dumps({"name": "x", "pad": "x" * (1024 * 1024)})
    for method, url in (
        ("POST", "/api/workspaces"),
        ("PUT", f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"),
    ):
        response = client.open(
            url,
            method=method,
            data=oversized,
            content_type="application/json",
            headers=world.auth("agent"),
        )
        assert response.status_code == 413
        body = response.get_json()
        assert body["error"] == "request_entity_too_large"
        assert body["message"]
    assert count(app, ApprovalRequest) == 0
    assert count(app, Workspace) == 4


def test_body_just_under_the_limit_is_accepted(client, world):
    value = "v" * (1024 * 1024 - 100)
    response = client.put(
        f"/api/workspaces/{world.ws['api']}/secrets/BIG",
        json={"value": value[:65536]},
        headers=world.auth("service"),
    )
    assert response.status_code == 201


# ---- secrets never come back out ---------------------------------------------------------------


def test_secret_values_are_never_echoed(app, client, world):
    api = world.ws["api"]
    url = f"/api/workspaces/{api}/secrets/DB_PASSWORD"
    created = client.put(
        f"/api/workspaces/{api}/secrets/API_KEY",
        json={"value": "created-value-123"},
        headers=world.auth("service"),
    )
    assert created.status_code == 201
    assert set(created.get_json()) == {"workspace_id", "name", "created_at", "updated_at"}

    pending = client.put(url, json={"value": "rotated-value-456"}, headers=world.auth("agent"))
    assert pending.status_code == 202
    approval_id = pending.get_json()["approval_id"]

    responses = [
        created,
        pending,
        client.get(f"/api/workspaces/{api}/secrets", headers=world.auth("alice")),
        client.get(f"/api/workspaces/{api}", headers=world.auth("alice")),
        client.get(f"/api/approvals/{approval_id}", headers=world.auth("alice")),
        client.get("/api/approvals", headers=world.auth("agent")),
    ]
    sealed = keyed_digest(app.config["SECRET_KEY"], "rotated-value-456")
    for response in responses:
        raw = response.get_data(as_text=True)
        for value in ("hunter2", "created-value-123", "rotated-value-456", sealed):
            assert value not in raw

    detail = responses[4].get_json()
    assert detail["context"]["target"] == {"secret": "DB_PASSWORD"}
    assert detail["context"]["sealed"] == ["value_hmac"]  # that a value is bound, not the value

    # What is stored is the hash over the keyed digest, never the value or an unkeyed hash of it.
    with app.app_context():
        stored = db.session.get(ApprovalRequest, approval_id)
        events = db.session.execute(select(ApprovalEvent.detail)).scalars().all()
        assert stored is not None
        dumped = json.dumps([stored.context, stored.summary, stored.workspace_path, events])
        assert "rotated-value-456" not in dumped
        assert sealed not in dumped
        token_id = world.token_ids["agent"]
        bound = {"secret": "DB_PASSWORD", "value_hmac": sealed}
        assert stored.request_hash == request_hash("secret.replace", api, bound, token_id)
        plain = {"secret": "DB_PASSWORD", "value_hmac": "rotated-value-456"}
        assert stored.request_hash != request_hash("secret.replace", api, plain, token_id)


# ---- scoped tokens and visibility --------------------------------------------------------------


def test_scoped_agent_stays_in_its_subtree(app, client, world):
    scoped = world.auth("agent_staging")
    api = world.ws["api"]
    for method, url in (
        ("GET", f"/api/workspaces/{api}"),
        ("DELETE", f"/api/workspaces/{api}"),
        ("DELETE", f"/api/workspaces/{api}/secrets/DB_PASSWORD"),
        ("DELETE", f"/api/workspaces/{api}/members/victor"),
    ):
        response = client.open(url, method=method, headers=scoped)
        assert response.status_code == 403, url
        assert response.get_json()["error"] == "forbidden"
    assert client.delete("/api/workspaces/99999", headers=scoped).status_code == 404
    root = client.post("/api/workspaces", json={"name": "rogue"}, headers=scoped)
    assert root.status_code == 403
    assert count(app, ApprovalRequest) == 0
    assert count(app, Workspace, Workspace.id == api) == 1

    inside = client.delete(f"/api/workspaces/{world.ws['staging']}", headers=scoped)
    assert inside.status_code == 202
    listed = client.get("/api/workspaces", headers=scoped).get_json()
    assert [w["id"] for w in listed["workspaces"]] == [world.ws["staging"]]


def test_approvals_are_visible_to_the_tree_they_belong_to(client, world):
    api_id = client.delete(
        f"/api/workspaces/{world.ws['api']}", headers=world.auth("agent")
    ).get_json()["approval_id"]
    staging_id = client.delete(
        f"/api/workspaces/{world.ws['staging']}", headers=world.auth("agent")
    ).get_json()["approval_id"]

    def ids(who: str, query: str = "") -> list[int]:
        response = client.get(f"/api/approvals{query}", headers=world.auth(who))
        assert response.status_code == 200
        return [a["id"] for a in response.get_json()["approvals"]]

    assert ids("alice") == [staging_id, api_id]  # newest first
    assert ids("carol") == [api_id]
    assert ids("victor") == [api_id]  # viewers see, but cannot decide
    assert ids("dave") == [staging_id]
    assert ids("mallory") == []
    assert ids("agent_staging") == [staging_id]
    assert ids("agent") == [staging_id, api_id]
    assert ids("alice", f"?workspace_id={world.ws['api']}") == [api_id]
    assert ids("alice", "?status=pending&limit=1") == [staging_id]
    assert ids("alice", "?status=approved") == []

    for who, status in (("dave", 404), ("mallory", 404), ("agent_staging", 404), ("victor", 200)):
        assert client.get(f"/api/approvals/{api_id}", headers=world.auth(who)).status_code == status
