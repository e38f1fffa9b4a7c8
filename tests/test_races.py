"""The gate under concurrency, on PostgreSQL: many callers released together by a Barrier.

Each thread has its own test client, so each request runs in its own app context with its own
session and pooled connection, as it would under a threaded server.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import conftest
import pytest
from conftest import World, engine_name
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, func, select
from werkzeug.security import generate_password_hash

from app.extensions import db
from app.models import ApprovalEvent, ApprovalRequest, ApprovalScope, Secret, Workspace

pytestmark = [
    pytest.mark.gate,
    pytest.mark.postgres_only,
    pytest.mark.skipif(engine_name() == "sqlite", reason="row locks need PostgreSQL"),
]


@pytest.fixture(autouse=True)
def cheap_seed_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here logs in with a password: hash the seeded users' cheaply to keep setup fast."""
    monkeypatch.setattr(
        conftest, "hash_password", lambda pw: generate_password_hash(pw, "pbkdf2:sha256:1000")
    )


CALLERS = 32


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any


CONSUME = "WITH consumed AS"  # the consume UPDATE (and pending lookup), one statement
INSERT_PENDING = "INSERT INTO approval_requests"
LOCK_FOR_DECISION = "SELECT approval_requests"


def all_at_once(
    app: Flask,
    count: int,
    send: Callable[[FlaskClient, int], Any],
    meet_at: str | None = None,
) -> list[Reply]:
    """Run ``send`` from ``count`` threads released together; return their replies in order.

    With ``meet_at``, the threads also wait for each other just before their first statement
    starting with that text, so all of them reach the contended statement at the same moment
    (the worst interleaving, every time) instead of whenever the scheduler lets them.
    """
    start = threading.Barrier(count)
    meeting = threading.Barrier(count)
    replies: list[Reply | None] = [None] * count
    errors: list[BaseException] = []
    met = threading.local()
    arrivals: list[int] = []

    def rendezvous(conn, cursor, statement, parameters, context, executemany):
        if meet_at and statement.lstrip().startswith(meet_at) and not getattr(met, "done", False):
            met.done = True
            arrivals.append(1)
            meeting.wait(timeout=60)

    def run(index: int) -> None:
        client = app.test_client()
        try:
            start.wait(timeout=60)
            response = send(client, index)
            replies[index] = Reply(response.status_code, response.get_json(silent=True))
        except BaseException as error:  # reported below, in the test's own thread
            errors.append(error)
            start.abort()
            meeting.abort()

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", rendezvous)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        event.remove(engine, "before_cursor_execute", rendezvous)
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    if meet_at:  # the forced interleaving really happened (the statement text still matches)
        assert len(arrivals) == count, f"{len(arrivals)} of {count} threads reached {meet_at!r}"
    assert errors == []
    assert all(reply is not None for reply in replies)
    return replies  # type: ignore[return-value]


def scalar(app: Flask, statement: Any) -> Any:
    with app.app_context():
        return db.session.execute(statement).scalar()


def count_rows(app: Flask, model: type, *where: Any) -> int:
    return scalar(app, select(func.count()).select_from(model).where(*where))


def approved(client: FlaskClient, world: World, method: str, url: str) -> int:
    """Ask once as the agent, have alice approve, return the approval id."""
    first = client.open(url, method=method, headers=world.auth("agent"))
    assert first.status_code == 202
    approval_id = first.get_json()["approval_id"]
    decision = client.post(
        f"/api/approvals/{approval_id}/decision",
        json={"decision": "approve"},
        headers=world.auth("alice"),
    )
    assert decision.status_code == 200
    return approval_id


TARGETS = {
    "workspace.delete": (
        lambda w: f"/api/workspaces/{w.ws['api']}",
        lambda app, w: count_rows(app, Workspace, Workspace.id == w.ws["api"]),
    ),
    "secret.delete": (
        lambda w: f"/api/workspaces/{w.ws['api']}/secrets/DB_PASSWORD",
        lambda app, w: count_rows(app, Secret, Secret.name == "DB_PASSWORD"),
    ),
}


@pytest.mark.parametrize(
    ("action", "meet_at"),
    [
        pytest.param("secret.delete", None, id="secret.delete-released"),
        pytest.param("secret.delete", CONSUME, id="secret.delete-met-at-consume"),
        # A workspace delete locks its subtree while describing it, so concurrent retries
        # queue there and cannot all meet at the consume: only the released variant applies.
        pytest.param("workspace.delete", None, id="workspace.delete-released"),
    ],
)
def test_concurrent_retries_consume_one_approval_once(app, client, world, action, meet_at):
    url_of, remaining = TARGETS[action]
    url = url_of(world)
    approval_id = approved(client, world, "DELETE", url)

    replies = all_at_once(
        app, CALLERS, lambda c, _: c.delete(url, headers=world.auth("agent")), meet_at=meet_at
    )

    statuses = Counter(reply.status for reply in replies)
    assert statuses[204] == 1, statuses
    # The others came too late (the target is gone: 404) or found no usable approval and asked
    # afresh (202); none failed and none ran the operation a second time.
    assert set(statuses) <= {204, 202, 404}, statuses
    if meet_at:  # all described the target before anyone consumed: all but one ask afresh
        assert statuses == {204: 1, 202: CALLERS - 1}, statuses
    assert remaining(app, world) == 0
    assert count_rows(app, ApprovalRequest, ApprovalRequest.status == "consumed") == 1
    assert scalar(app, select(ApprovalRequest.status).where(ApprovalRequest.id == approval_id)) == (
        "consumed"
    )
    assert count_rows(app, ApprovalEvent, ApprovalEvent.kind == "consumed") == 1
    new_ids = {reply.body["approval_id"] for reply in replies if reply.status == 202}
    assert approval_id not in new_ids


def test_two_approvals_for_one_secret_delete_it_once_and_the_late_one_stays_usable(
    app, client, world
):
    """Two agents, each approved for the same secret, retry at once: both described it and both
    consume. The second DELETE finds the row gone: 404, rolled back, its approval not spent."""
    url = f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"
    agents = ["agent", "agent_y"]
    ids = {}
    for agent in agents:
        first = client.delete(url, headers=world.auth(agent))
        assert first.status_code == 202
        ids[agent] = first.get_json()["approval_id"]
        decided = client.post(
            f"/api/approvals/{ids[agent]}/decision",
            json={"decision": "approve"},
            headers=world.auth("alice"),
        )
        assert decided.status_code == 200

    replies = all_at_once(
        app, 2, lambda c, i: c.delete(url, headers=world.auth(agents[i])), meet_at=CONSUME
    )

    assert sorted(reply.status for reply in replies) == [204, 404], replies
    late = agents[[reply.status for reply in replies].index(404)]
    statuses = {
        agent: scalar(app, select(ApprovalRequest.status).where(ApprovalRequest.id == ids[agent]))
        for agent in agents
    }
    assert statuses[late] == "approved", statuses
    assert sorted(statuses.values()) == ["approved", "consumed"], statuses
    assert count_rows(app, Secret, Secret.name == "DB_PASSWORD") == 0


@pytest.mark.parametrize("meet_at", [None, INSERT_PENDING], ids=["released", "met-at-insert"])
def test_concurrent_first_calls_share_one_pending_request(app, world, meet_at):
    url = f"/api/workspaces/{world.ws['api']}"
    replies = all_at_once(
        app, CALLERS, lambda c, _: c.delete(url, headers=world.auth("agent")), meet_at=meet_at
    )

    assert [reply.status for reply in replies] == [202] * CALLERS
    ids = {reply.body["approval_id"] for reply in replies}
    assert len(ids) == 1
    (approval_id,) = ids
    assert count_rows(app, ApprovalRequest) == 1
    assert count_rows(app, ApprovalEvent, ApprovalEvent.kind == "created") == 1
    assert count_rows(app, ApprovalScope, ApprovalScope.approval_id == approval_id) == 3
    assert count_rows(app, Workspace, Workspace.id == world.ws["api"]) == 1


def test_concurrent_first_calls_from_two_agents_get_one_request_each(app, world):
    url = f"/api/workspaces/{world.ws['api']}"
    agents = ["agent", "agent_y"]
    replies = all_at_once(
        app, CALLERS, lambda c, i: c.delete(url, headers=world.auth(agents[i % 2]))
    )

    assert {reply.status for reply in replies} == {202}
    per_agent = {
        agent: {reply.body["approval_id"] for reply in replies[i::2]}
        for i, agent in enumerate(agents)
    }
    assert all(len(ids) == 1 for ids in per_agent.values())
    assert per_agent["agent"] != per_agent["agent_y"]
    assert count_rows(app, ApprovalRequest) == 2


def test_concurrent_decisions_one_wins(app, client, world):
    first = client.delete(f"/api/workspaces/{world.ws['api']}", headers=world.auth("agent"))
    approval_id = first.get_json()["approval_id"]
    deciders = [
        ("alice", {"decision": "approve"}),
        ("carol", {"decision": "deny", "reason": "racing"}),
    ]

    def decide(c: FlaskClient, index: int):
        who, body = deciders[index % 2]
        return c.post(f"/api/approvals/{approval_id}/decision", json=body, headers=world.auth(who))

    replies = all_at_once(app, 8, decide, meet_at=LOCK_FOR_DECISION)

    statuses = Counter(reply.status for reply in replies)
    assert statuses == {200: 1, 409: 7}, statuses
    (winner,) = [reply.body for reply in replies if reply.status == 200]
    stored = scalar(app, select(ApprovalRequest.status).where(ApprovalRequest.id == approval_id))
    assert stored == winner["status"]
    decisions = count_rows(app, ApprovalEvent, ApprovalEvent.kind.in_(["approved", "denied"]))
    assert decisions == 1


def test_withdraw_racing_a_decision_one_wins(app, client, world):
    names = ["RACE_A", "RACE_B", "RACE_C", "RACE_D"]
    api = world.ws["api"]
    ids = []
    for name in names:
        made = client.put(
            f"/api/workspaces/{api}/secrets/{name}",
            json={"value": "v"},
            headers=world.auth("service"),
        )
        assert made.status_code == 201
        asked = client.delete(f"/api/workspaces/{api}/secrets/{name}", headers=world.auth("agent"))
        ids.append(asked.get_json()["approval_id"])

    def act(c: FlaskClient, index: int):
        approval_id = ids[index // 2]
        if index % 2:
            return c.post(f"/api/approvals/{approval_id}/withdraw", headers=world.auth("agent"))
        return c.post(
            f"/api/approvals/{approval_id}/decision",
            json={"decision": "approve"},
            headers=world.auth("alice"),
        )

    replies = all_at_once(app, 2 * len(ids), act)

    for n, approval_id in enumerate(ids):
        pair = replies[2 * n : 2 * n + 2]
        assert sorted(reply.status for reply in pair) == [200, 409], pair
        (winner,) = [reply.body for reply in pair if reply.status == 200]
        stored = scalar(
            app, select(ApprovalRequest.status).where(ApprovalRequest.id == approval_id)
        )
        assert stored == winner["status"] in {"approved", "withdrawn"}
