"""The approval gate end to end, through the API, on the real database (PostgreSQL or SQLite)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import conftest
import psycopg
import pytest
from conftest import World, engine_name, make_app
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, func, select, text, update
from werkzeug.security import generate_password_hash

from app.extensions import db
from app.models import (
    ApiToken,
    ApprovalEvent,
    ApprovalRequest,
    Membership,
    Secret,
    User,
    Workspace,
    utcnow,
)
from app.policy import POLICY, ActionPolicy

pytestmark = pytest.mark.gate
needs_postgres = pytest.mark.skipif(engine_name() == "sqlite", reason="needs PostgreSQL")


@pytest.fixture(autouse=True)
def cheap_seed_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here logs in with a password: hash the seeded users' cheaply to keep setup fast."""
    monkeypatch.setattr(
        conftest, "hash_password", lambda pw: generate_password_hash(pw, "pbkdf2:sha256:1000")
    )


# ---- helpers -----------------------------------------------------------------------------------


def ws_url(world: World, name: str, query: str = "") -> str:
    return f"/api/workspaces/{world.ws[name]}{query}"


def secret_url(world: World, name: str = "DB_PASSWORD", workspace: str = "api") -> str:
    return f"/api/workspaces/{world.ws[workspace]}/secrets/{name}"


def pending_id(response) -> int:
    """The approval id of a 202, failing loudly on anything else."""
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert body["status"] == "pending"
    return body["approval_id"]


def decide(
    client: FlaskClient,
    world: World,
    approval_id: int,
    who: str = "alice",
    decision: str = "approve",
    reason: str | None = None,
):
    body: dict[str, Any] = {"decision": decision}
    if reason is not None:
        body["reason"] = reason
    return client.post(f"/api/approvals/{approval_id}/decision", json=body, headers=world.auth(who))


def approve(client: FlaskClient, world: World, approval_id: int) -> None:
    response = decide(client, world, approval_id)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "approved"


def row(app: Flask, approval_id: int) -> ApprovalRequest:
    with app.app_context():
        found = db.session.get(ApprovalRequest, approval_id)
        assert found is not None
        db.session.expunge(found)
        return found


def count(app: Flask, model: type, *where: Any) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(model).where(*where)).scalar()


def workspace_exists(app: Flask, workspace_id: int) -> bool:
    return count(app, Workspace, Workspace.id == workspace_id) == 1


def secret_value(app: Flask, workspace_id: int, name: str) -> str | None:
    with app.app_context():
        return db.session.execute(
            select(Secret.value).where(Secret.workspace_id == workspace_id, Secret.name == name)
        ).scalar_one_or_none()


def set_approval(app: Flask, approval_id: int, **values: Any) -> None:
    """Change an approval row behind the API's back, as time passing would."""
    with app.app_context():
        db.session.execute(
            update(ApprovalRequest).where(ApprovalRequest.id == approval_id).values(**values)
        )
        db.session.commit()


def event_kinds(client: FlaskClient, world: World, approval_id: int) -> list[str]:
    response = client.get(f"/api/approvals/{approval_id}", headers=world.auth("alice"))
    assert response.status_code == 200
    return [e["kind"] for e in response.get_json()["events"]]


# ---- the full cycle ----------------------------------------------------------------------------


def test_full_cycle_pending_approve_consume(app, client, world):
    url = ws_url(world, "api")
    first = client.delete(url, headers=world.auth("agent"))
    approval_id = pending_id(first)
    body = first.get_json()
    assert body["action"] == "workspace.delete"
    assert body["workspace_id"] == world.ws["api"]
    assert body["summary"] == "Delete workspace acme / prod / api"
    assert body["status_url"] == f"/api/approvals/{approval_id}"
    assert first.headers["Location"] == body["status_url"]
    assert first.headers["Retry-After"] == str(app.config["COUNTERSIGN_RETRY_AFTER"])
    assert datetime.fromisoformat(body["expires_at"]) > utcnow() + timedelta(hours=23)
    assert workspace_exists(app, world.ws["api"])

    again = client.delete(url, headers=world.auth("agent"))
    assert pending_id(again) == approval_id
    assert count(app, ApprovalRequest) == 1

    approve(client, world, approval_id)
    assert workspace_exists(app, world.ws["api"])  # approving alone does nothing

    done = client.delete(url, headers=world.auth("agent"))
    assert done.status_code == 204
    assert done.get_data() == b""
    assert not workspace_exists(app, world.ws["api"])
    assert count(app, Secret, Secret.workspace_id == world.ws["api"]) == 0  # cascaded
    assert client.get(url, headers=world.auth("service")).status_code == 404

    detail = client.get(body["status_url"], headers=world.auth("alice")).get_json()
    assert detail["status"] == "consumed"
    assert detail["consumed_at"] is not None
    assert detail["decided_by"] == "alice"
    assert [(e["kind"], e["actor"]) for e in detail["events"]] == [
        ("created", "agent:agent"),
        ("approved", "user:alice"),
        ("consumed", "agent:agent"),
    ]


def test_an_approval_is_used_once(app, client, world):
    url = secret_url(world)
    first_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, first_id)
    assert client.delete(url, headers=world.auth("agent")).status_code == 204
    # Creating a secret is not gated; deleting the same thing again needs a new countersignature.
    put = client.put(url, json={"value": "again"}, headers=world.auth("agent"))
    assert put.status_code == 201
    second_id = pending_id(client.delete(url, headers=world.auth("agent")))
    assert second_id != first_id
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "again"
    assert row(app, first_id).status == "consumed"
    assert row(app, second_id).status == "pending"


# Every gated action: (request the agent sends, check that the operation really happened).
Op = Callable[[World], tuple[str, str, dict[str, Any] | None]]
GATED_OPERATIONS: dict[str, tuple[Op, Callable[[Flask, World, Any], bool]]] = {
    "workspace.delete": (
        lambda w: ("DELETE", ws_url(w, "api"), None),
        lambda app, w, _: not workspace_exists(app, w.ws["api"]),
    ),
    "secret.delete": (
        lambda w: ("DELETE", secret_url(w), None),
        lambda app, w, _: secret_value(app, w.ws["api"], "DB_PASSWORD") is None,
    ),
    "secret.replace": (
        lambda w: ("PUT", secret_url(w), {"value": "rotated"}),
        lambda app, w, _: secret_value(app, w.ws["api"], "DB_PASSWORD") == "rotated",
    ),
    "token.mint": (
        lambda w: ("POST", "/api/tokens", {"kind": "service", "name": "ci"}),
        lambda app, w, _: (
            count(app, ApiToken, ApiToken.name == "ci", ApiToken.kind == "service") == 1
        ),
    ),
    "token.revoke": (
        lambda w: ("DELETE", f"/api/tokens/{w.token_ids['agent_y']}", None),
        lambda app, w, _: (
            count(
                app,
                ApiToken,
                ApiToken.id == w.token_ids["agent_y"],
                ApiToken.revoked_at.is_not(None),
            )
            == 1
        ),
    ),
    "member.remove": (
        lambda w: ("DELETE", f"/api/workspaces/{w.ws['api']}/members/victor", None),
        lambda app, w, _: (
            count(
                app,
                Membership,
                Membership.user_id.in_(select(User.id).where(User.username == "victor")),
            )
            == 0
        ),
    ),
}


@pytest.mark.parametrize("action", sorted(GATED_OPERATIONS))
def test_every_gated_action_waits_for_a_human(app, client, world, action):
    build, happened = GATED_OPERATIONS[action]
    method, url, body = build(world)

    def send():
        return client.open(url, method=method, json=body, headers=world.auth("agent"))

    first = send()
    approval_id = pending_id(first)
    assert first.get_json()["action"] == action
    assert pending_id(send()) == approval_id
    assert not happened(app, world, first)

    approve(client, world, approval_id)
    done = send()
    assert done.status_code in (200, 201, 204), done.get_data(as_text=True)
    assert happened(app, world, done)
    assert row(app, approval_id).status == "consumed"


def test_minting_a_scoped_agent_token_is_not_gated(app, client, world):
    response = client.post(
        "/api/tokens",
        json={"kind": "agent", "name": "helper", "workspace_id": world.ws["staging"]},
        headers=world.auth("agent"),
    )
    assert response.status_code == 201
    assert count(app, ApprovalRequest) == 0
    minted = {"Authorization": f"Bearer {response.get_json()['token']}"}
    assert client.get(ws_url(world, "staging"), headers=minted).status_code == 200


# ---- replay: an approval covers exactly one request --------------------------------------------


def test_approval_for_one_workspace_does_not_delete_another(app, client, world):
    api_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    approve(client, world, api_id)
    other = client.delete(ws_url(world, "staging"), headers=world.auth("agent"))
    assert pending_id(other) != api_id
    assert workspace_exists(app, world.ws["staging"])
    assert row(app, api_id).status == "approved"  # still there for the request it was for
    assert client.delete(ws_url(world, "api"), headers=world.auth("agent")).status_code == 204


def test_approval_is_bound_to_the_calling_token(app, client, world):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    approve(client, world, approval_id)
    other = client.delete(ws_url(world, "api"), headers=world.auth("agent_y"))
    other_id = pending_id(other)
    assert other_id != approval_id
    assert workspace_exists(app, world.ws["api"])
    assert row(app, approval_id).status == "approved"
    assert row(app, other_id).requested_by_token_id == world.token_ids["agent_y"]


def test_recursive_flag_needs_its_own_approval(app, client, world):
    recursive = ws_url(world, "staging", "?recursive=true")
    approval_id = pending_id(client.delete(recursive, headers=world.auth("agent")))
    approve(client, world, approval_id)
    plain = client.delete(ws_url(world, "staging"), headers=world.auth("agent"))
    assert pending_id(plain) != approval_id
    assert workspace_exists(app, world.ws["staging"])
    assert client.delete(recursive, headers=world.auth("agent")).status_code == 204


def test_secret_replace_approval_is_bound_to_the_value(app, client, world):
    url = secret_url(world)
    approval_id = pending_id(client.put(url, json={"value": "v1"}, headers=world.auth("agent")))
    approve(client, world, approval_id)
    other = client.put(url, json={"value": "v2"}, headers=world.auth("agent"))
    assert pending_id(other) != approval_id
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "hunter2"
    done = client.put(url, json={"value": "v1"}, headers=world.auth("agent"))
    assert done.status_code == 200
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "v1"


def test_secret_delete_approval_does_not_replace_the_secret(app, client, world):
    url = secret_url(world)
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, approval_id)
    replace = client.put(url, json={"value": "x"}, headers=world.auth("agent"))
    assert pending_id(replace) != approval_id
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "hunter2"


def test_new_child_invalidates_an_approved_recursive_delete(app, client, world):
    url = ws_url(world, "prod", "?recursive=true")
    first = client.delete(url, headers=world.auth("agent"))
    approval_id = pending_id(first)
    assert first.get_json()["summary"] == "Delete workspace acme / prod and its 1 descendant(s)"
    approve(client, world, approval_id)

    child = client.post(
        "/api/workspaces",
        json={"name": "late-child", "parent_id": world.ws["prod"]},
        headers=world.auth("service"),
    )
    assert child.status_code == 201

    retry = client.delete(url, headers=world.auth("agent"))
    assert pending_id(retry) != approval_id
    assert retry.get_json()["summary"] == "Delete workspace acme / prod and its 2 descendant(s)"
    assert workspace_exists(app, world.ws["prod"])
    assert workspace_exists(app, child.get_json()["id"])
    assert row(app, approval_id).status == "approved"


def test_deleting_a_parent_without_recursive_is_refused(app, client, world):
    response = client.delete(ws_url(world, "prod"), headers=world.auth("agent"))
    assert response.status_code == 409
    assert response.get_json()["error"] == "has_children"
    assert count(app, ApprovalRequest) == 0


# ---- a failed operation does not use up the approval -------------------------------------------


class Injected:
    """A failure injected into the operation's own transaction, lifted on demand."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove = remove
        self.active = True

    def lift(self) -> None:
        if self.active:
            self._remove()
            self.active = False


@pytest.fixture
def failing_secret_delete(app: Flask) -> Iterator[Injected]:
    """The app raises as it deletes a secret, inside the view's transaction (after the consume)."""

    def refuse(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("DELETE FROM secrets"):
            raise RuntimeError("injected failure while deleting a secret")

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", refuse)
    injected = Injected(lambda: event.remove(engine, "before_cursor_execute", refuse))
    yield injected
    injected.lift()


@pytest.fixture
def failing_workspace_delete(app: Flask) -> Iterator[Injected]:
    """A trigger makes the database itself reject deleting a workspace."""
    if engine_name() == "sqlite":
        create = (
            "CREATE TRIGGER refuse_workspace_delete BEFORE DELETE ON workspaces "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        drop = ["DROP TRIGGER IF EXISTS refuse_workspace_delete"]
    else:
        create = (
            "CREATE FUNCTION refuse_workspace_delete() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; "
            "CREATE TRIGGER refuse_workspace_delete BEFORE DELETE ON workspaces "
            "FOR EACH ROW EXECUTE FUNCTION refuse_workspace_delete()"
        )
        drop = [
            "DROP TRIGGER IF EXISTS refuse_workspace_delete ON workspaces",
            "DROP FUNCTION IF EXISTS refuse_workspace_delete()",
        ]

    def run(*statements: str) -> None:
        with app.app_context():
            for statement in statements:
                db.session.execute(text(statement))
            db.session.commit()

    run(create)
    injected = Injected(lambda: run(*drop))
    yield injected
    injected.lift()


def test_an_exception_after_consume_leaves_the_approval_usable(
    app, client, world, failing_secret_delete
):
    url = secret_url(world)
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, approval_id)

    failed = client.delete(url, headers=world.auth("agent"))
    assert failed.status_code == 500
    assert failed.get_json()["error"] == "internal_error"
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "hunter2"
    after = row(app, approval_id)
    assert (after.status, after.consumed_at) == ("approved", None)
    assert "consumed" not in event_kinds(client, world, approval_id)

    failing_secret_delete.lift()
    done = client.delete(url, headers=world.auth("agent"))
    assert done.status_code == 204
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") is None
    assert row(app, approval_id).status == "consumed"


def test_failed_statement_after_consume_leaves_the_approval_usable(
    app, client, world, failing_workspace_delete
):
    url = ws_url(world, "api")
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, approval_id)

    failed = client.delete(url, headers=world.auth("agent"))
    assert failed.status_code == 500
    assert workspace_exists(app, world.ws["api"])
    assert row(app, approval_id).status == "approved"

    failing_workspace_delete.lift()
    assert client.delete(url, headers=world.auth("agent")).status_code == 204
    assert not workspace_exists(app, world.ws["api"])
    assert event_kinds(client, world, approval_id) == ["created", "approved", "consumed"]


# ---- denial and expiry -------------------------------------------------------------------------


def test_denied_request_answers_403_with_the_reason(app, client, world):
    url = ws_url(world, "api")
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    denied = decide(client, world, approval_id, decision="deny", reason="production, not today")
    assert denied.status_code == 200
    assert denied.get_json()["status"] == "denied"

    for _ in range(2):  # the denial stays the answer; no new request is opened
        retry = client.delete(url, headers=world.auth("agent"))
        assert retry.status_code == 403
        assert retry.get_json() == {
            "error": "approval_denied",
            "message": retry.get_json()["message"],
            "approval_id": approval_id,
            "reason": "production, not today",
        }
    assert workspace_exists(app, world.ws["api"])
    assert count(app, ApprovalRequest) == 1
    # Another caller's request is a different request.
    assert pending_id(client.delete(url, headers=world.auth("agent_y"))) != approval_id


def test_denial_needs_a_reason(app, client, world):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    for body in ({"decision": "deny"}, {"decision": "deny", "reason": "   "}):
        response = client.post(
            f"/api/approvals/{approval_id}/decision", json=body, headers=world.auth("alice")
        )
        assert response.status_code == 422
        assert response.get_json()["field"] == "reason"
    assert row(app, approval_id).status == "pending"


def test_expired_pending_request_reads_expired_and_a_retry_opens_a_new_one(app, client, world):
    url = ws_url(world, "api")
    old_id = pending_id(client.delete(url, headers=world.auth("agent")))
    set_approval(app, old_id, expires_at=utcnow() - timedelta(seconds=1))

    status = client.get(f"/api/approvals/{old_id}", headers=world.auth("alice")).get_json()
    assert status["status"] == "expired"
    listed = client.get("/api/approvals?status=expired", headers=world.auth("alice")).get_json()
    assert [a["id"] for a in listed["approvals"]] == [old_id]
    pending = client.get("/api/approvals?status=pending", headers=world.auth("alice")).get_json()
    assert pending["approvals"] == []
    late = decide(client, world, old_id)
    assert late.status_code == 409
    assert late.get_json()["status"] == "expired"

    new_id = pending_id(client.delete(url, headers=world.auth("agent")))
    assert new_id != old_id
    assert row(app, old_id).status == "expired"
    assert row(app, new_id).status == "pending"
    assert workspace_exists(app, world.ws["api"])
    assert event_kinds(client, world, old_id) == ["created", "expired"]


def test_expired_approval_is_not_consumed(app, client, world):
    url = ws_url(world, "api")
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, approval_id)
    set_approval(app, approval_id, approval_expires_at=utcnow() - timedelta(seconds=1))

    retry = client.delete(url, headers=world.auth("agent"))
    assert pending_id(retry) != approval_id
    assert workspace_exists(app, world.ws["api"])
    stale = row(app, approval_id)
    assert (stale.status, stale.consumed_at) == ("approved", None)
    read = client.get(f"/api/approvals/{approval_id}", headers=world.auth("alice")).get_json()
    assert read["status"] == "expired"


def test_worker_expires_due_requests(app, client, world, runner):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    set_approval(app, approval_id, expires_at=utcnow() - timedelta(seconds=1))
    result = runner.invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    assert "expired 1 request(s)" in result.output
    assert row(app, approval_id).status == "expired"
    assert runner.invoke(args=["worker", "--once"]).output == ""


# ---- who decides -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "who",
    ["agent", "agent_y", "agent_staging", "service", "victor", "dave", "mallory"],
)
@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_who_may_not_decide(app, client, world, who, decision):
    """Tokens never decide; neither do viewers, approvers of a sibling, or outsiders."""
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    response = decide(client, world, approval_id, who=who, decision=decision, reason="because")
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    after = row(app, approval_id)
    assert (after.status, after.decided_at) == ("pending", None)


@pytest.mark.parametrize(("who", "level"), [("carol", 0), ("alice", 2)])
def test_approvers_of_the_workspace_or_an_ancestor_decide(app, client, world, who, level):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    response = decide(client, world, approval_id, who=who)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["decided_by"], body["decided_level"]) == ("approved", who, level)
    assert datetime.fromisoformat(body["approval_expires_at"]) > utcnow()


def test_approver_of_the_parent_decides_at_level_1(app, client, world):
    made = client.put(
        f"/api/workspaces/{world.ws['prod']}/members/dave",
        json={"role": "approver"},
        headers=world.auth("service"),
    )
    assert made.status_code == 201
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    response = decide(client, world, approval_id, who="dave")
    assert response.status_code == 200
    assert response.get_json()["decided_level"] == 1


def test_deciding_twice_conflicts(app, client, world):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    approve(client, world, approval_id)
    again = decide(client, world, approval_id, who="carol", decision="deny", reason="no")
    assert again.status_code == 409
    assert again.get_json()["error"] == "not_pending"
    after = row(app, approval_id)
    assert (after.status, after.decided_by_name) == ("approved", "alice")


def test_deciding_an_unknown_approval_is_404(client, world):
    assert decide(client, world, 4242).status_code == 404


# ---- withdrawing -------------------------------------------------------------------------------


def test_requester_withdraws_and_the_next_call_asks_again(app, client, world):
    url = ws_url(world, "api")
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    response = client.post(f"/api/approvals/{approval_id}/withdraw", headers=world.auth("agent"))
    assert response.status_code == 200
    assert response.get_json()["status"] == "withdrawn"
    assert event_kinds(client, world, approval_id) == ["created", "withdrawn"]
    assert decide(client, world, approval_id).status_code == 409
    assert pending_id(client.delete(url, headers=world.auth("agent"))) != approval_id


@pytest.mark.parametrize("who", ["agent_y", "service", "alice"])
def test_only_the_requester_may_withdraw(app, client, world, who):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    response = client.post(f"/api/approvals/{approval_id}/withdraw", headers=world.auth(who))
    assert response.status_code == 403
    assert row(app, approval_id).status == "pending"


def test_withdraw_after_a_decision_conflicts(app, client, world):
    approval_id = pending_id(client.delete(ws_url(world, "api"), headers=world.auth("agent")))
    approve(client, world, approval_id)
    response = client.post(f"/api/approvals/{approval_id}/withdraw", headers=world.auth("agent"))
    assert response.status_code == 409
    assert row(app, approval_id).status == "approved"


# ---- callers the policy does not gate ----------------------------------------------------------


def test_service_token_runs_at_once(app, client, world):
    response = client.delete(ws_url(world, "api"), headers=world.auth("service"))
    assert response.status_code == 204
    assert not workspace_exists(app, world.ws["api"])
    assert count(app, ApprovalRequest) == 0


def test_human_owner_runs_at_once_but_a_viewer_may_not(app, client, world):
    refused = client.delete(secret_url(world), headers=world.auth("victor"))
    assert refused.status_code == 403
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") == "hunter2"
    done = client.delete(secret_url(world), headers=world.auth("alice"))
    assert done.status_code == 204
    assert secret_value(app, world.ws["api"], "DB_PASSWORD") is None
    assert count(app, ApprovalRequest) == 0


def test_policy_decides_which_kinds_are_gated(app, client, world, monkeypatch):
    gated = POLICY["workspace.delete"]
    monkeypatch.setitem(
        POLICY,
        "workspace.delete",
        ActionPolicy(gated.action, gated.summary, gated_kinds=frozenset({"agent", "service"})),
    )
    response = client.delete(ws_url(world, "api"), headers=world.auth("service"))
    assert pending_id(response)
    assert workspace_exists(app, world.ws["api"])


# ---- fail closed -------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_unreachable_fails_closed(app, world):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/countersign"
    broken = make_app(url, SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"connect_timeout": 2}})
    try:
        response = broken.test_client().delete(ws_url(world, "api"), headers=world.auth("agent"))
        assert response.status_code == 503
        body = response.get_json()
        assert body["error"] == "unavailable"
        assert body["message"]
    finally:
        with broken.app_context():
            db.engine.dispose()
        broken.extensions["countersign_events"].stop()
    assert workspace_exists(app, world.ws["api"])
    assert count(app, ApprovalRequest) == 0


@pytest.fixture
def connection_killer(app: Flask) -> Iterator[Callable[[str], None]]:
    """Terminate the request's own PostgreSQL backend just before a chosen statement."""
    admin_url = os.environ["TEST_DATABASE_URL"]
    armed: dict[str, str] = {}

    def before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
        prefix = armed.get("prefix")
        if prefix and statement.lstrip().startswith(prefix):
            armed.clear()
            pid = conn.connection.dbapi_connection.info.backend_pid
            with psycopg.connect(admin_url, autocommit=True) as admin:
                # With a timeout, pg_terminate_backend waits until the backend is gone.
                admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    yield lambda prefix: armed.update(prefix=prefix)
    event.remove(engine, "before_cursor_execute", before_cursor_execute)


@pytest.mark.postgres_only
@needs_postgres
def test_connection_lost_at_consume_fails_closed(app, client, world, connection_killer):
    url = ws_url(world, "api")
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    approve(client, world, approval_id)

    connection_killer("WITH consumed AS")  # the consuming statement
    response = client.delete(url, headers=world.auth("agent"))
    assert response.status_code == 503
    assert response.get_json()["error"] == "gate_unavailable"
    assert workspace_exists(app, world.ws["api"])
    assert row(app, approval_id).status == "approved"
    # The next call, on a fresh connection, goes through.
    assert client.delete(url, headers=world.auth("agent")).status_code == 204


@pytest.mark.postgres_only
@needs_postgres
def test_connection_lost_while_recording_the_request_fails_closed(
    app, client, world, connection_killer
):
    url = ws_url(world, "api")
    connection_killer("INSERT INTO approval_requests")
    response = client.delete(url, headers=world.auth("agent"))
    assert response.status_code == 503
    assert response.get_json()["error"] == "gate_unavailable"
    assert workspace_exists(app, world.ws["api"])
    assert count(app, ApprovalRequest) == 0
    assert pending_id(client.delete(url, headers=world.auth("agent")))


def test_broken_policy_entry_fails_closed(app, client, world, monkeypatch):
    monkeypatch.setitem(
        POLICY, "workspace.delete", ActionPolicy("workspace.delete", "Delete {no_such_field}")
    )
    response = client.delete(ws_url(world, "api"), headers=world.auth("agent"))
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "gate_unavailable"
    assert body["message"]
    assert workspace_exists(app, world.ws["api"])
    assert count(app, ApprovalRequest) == 0
    assert count(app, ApprovalEvent) == 0
