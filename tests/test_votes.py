"""N-of-M approvals: votes from distinct humans, one denial ends it, the owner may be barred."""

from __future__ import annotations

import threading

import pytest
from conftest import World
from depth_support import (
    PolicyApps,
    add_member,
    add_secrets,
    decide,
    events,
    pending_id,
    read,
    secret_url,
)
from flask import Flask
from sqlalchemy import func, select

from app import audit
from app.extensions import db
from app.models import ApprovalVote

TWO_OF_THREE = """
[actions."secret.delete"]
approvals_required = 2
forbid_requester_owner = true
"""


@pytest.fixture
def two_of_three(app, world: World, policy_apps: PolicyApps) -> Flask:
    """secret.delete needs 2 of: carol (api), mallory (prod, made approver here), alice (acme)."""
    tuned = policy_apps.build(TWO_OF_THREE)
    add_member(tuned.test_client(), world, "prod", "mallory", "approver")
    return tuned


def vote_rows(app: Flask, approval_id: int) -> list[tuple[str, str, int]]:
    with app.app_context():
        return [
            (v.username, v.decision, v.level)
            for v in db.session.execute(
                select(ApprovalVote)
                .where(ApprovalVote.approval_id == approval_id)
                .order_by(ApprovalVote.id)
            ).scalars()
        ]


@pytest.mark.gate
def test_two_distinct_approvals_approve_and_the_agent_proceeds(two_of_three, world):
    client = two_of_three.test_client()
    url = secret_url(world)
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    assert read(client, world, approval_id)["approvals_required"] == 2

    first = decide(client, world, approval_id, "carol")
    assert first.status_code == 200
    body = first.get_json()
    assert (body["status"], body["approvals_count"], body["approvals_required"]) == (
        "pending",
        1,
        2,
    )
    assert body["decided_by"] is None
    assert pending_id(client.delete(url, headers=world.auth("agent"))) == approval_id  # still 202

    again = decide(client, world, approval_id, "carol")
    assert again.status_code == 409
    assert again.get_json()["error"] == "already_voted"
    assert again.get_json()["approvals_count"] == 1
    assert read(client, world, approval_id)["approvals_count"] == 1

    second = decide(client, world, approval_id, "alice", reason="checked with carol")
    assert second.status_code == 200
    body = second.get_json()
    assert (body["status"], body["approvals_count"], body["decided_by"]) == ("approved", 2, "alice")
    assert [(v["user"], v["decision"], v["level"]) for v in body["votes"]] == [
        ("carol", "approve", 0),
        ("alice", "approve", 2),
    ]

    assert client.delete(url, headers=world.auth("agent")).status_code == 204
    detail = read(client, world, approval_id)
    assert [e["kind"] for e in detail["events"]] == ["created", "voted", "approved", "consumed"]
    voted = detail["events"][1]["detail"]
    assert (voted["approvals"], voted["required"], voted["level"]) == (1, 2, 0)


@pytest.mark.gate
def test_the_owner_of_the_asking_agent_may_not_approve_it(two_of_three, world):
    client = two_of_three.test_client()
    minted = client.post(
        "/api/tokens",
        json={
            "kind": "agent",
            "name": "carols-bot",
            "user": "carol",
            "workspace_id": world.ws["api"],
        },
        headers=world.auth("service"),
    )
    assert minted.status_code == 201, minted.get_data(as_text=True)
    assert minted.get_json()["user"] == "carol"
    bot = {"Authorization": f"Bearer {minted.get_json()['token']}"}

    approval_id = pending_id(client.delete(secret_url(world), headers=bot))
    refused = decide(client, world, approval_id, "carol")
    assert refused.status_code == 403
    assert refused.get_json()["error"] == "requester_owner"
    assert vote_rows(two_of_three, approval_id) == []

    assert decide(client, world, approval_id, "mallory").get_json()["status"] == "pending"
    assert decide(client, world, approval_id, "alice").get_json()["status"] == "approved"
    assert client.delete(secret_url(world), headers=bot).status_code == 204


@pytest.mark.gate
def test_without_forbid_requester_owner_the_owner_may_approve(app, client, world):
    minted = client.post(
        "/api/tokens",
        json={
            "kind": "agent",
            "name": "carols-bot",
            "user": "carol",
            "workspace_id": world.ws["api"],
        },
        headers=world.auth("service"),
    )
    bot = {"Authorization": f"Bearer {minted.get_json()['token']}"}
    approval_id = pending_id(client.delete(secret_url(world), headers=bot))
    assert decide(client, world, approval_id, "carol").get_json()["status"] == "approved"


@pytest.mark.gate
def test_agent_owners_are_the_minter_or_inherited(app, client, world):
    """A human names only themselves; a service anyone; an owned agent's tokens stay owned."""
    api = world.ws["api"]
    refused = client.post(
        "/api/tokens",
        json={"kind": "agent", "name": "x", "user": "carol", "workspace_id": api},
        headers=world.auth("alice"),
    )
    assert refused.status_code == 403
    own = client.post(
        "/api/tokens",
        json={"kind": "agent", "name": "alices-bot", "user": "alice", "workspace_id": api},
        headers=world.auth("alice"),
    )
    assert own.status_code == 201
    child = client.post(
        "/api/tokens",
        json={"kind": "agent", "name": "sub-bot", "workspace_id": api},
        headers={"Authorization": f"Bearer {own.get_json()['token']}"},
    )
    assert child.status_code == 201
    assert child.get_json()["user"] == "alice"
    service_with_user = client.post(
        "/api/tokens",
        json={"kind": "service", "name": "s", "user": "alice", "workspace_id": api},
        headers=world.auth("service"),
    )
    assert service_with_user.status_code == 422


@pytest.mark.gate
def test_a_denial_after_one_approval_ends_the_request(two_of_three, world):
    client = two_of_three.test_client()
    url = secret_url(world)
    approval_id = pending_id(client.delete(url, headers=world.auth("agent")))
    assert decide(client, world, approval_id, "carol").get_json()["status"] == "pending"

    denied = decide(client, world, approval_id, "mallory", "deny", reason="not during the freeze")
    assert denied.status_code == 200
    assert (denied.get_json()["status"], denied.get_json()["reason"]) == (
        "denied",
        "not during the freeze",
    )
    late = decide(client, world, approval_id, "alice")
    assert late.status_code == 409
    assert late.get_json()["error"] == "not_pending"

    retry = client.delete(url, headers=world.auth("agent"))
    assert retry.status_code == 403
    assert retry.get_json()["error"] == "approval_denied"
    assert vote_rows(two_of_three, approval_id) == [
        ("carol", "approve", 0),
        ("mallory", "deny", 1),
    ]


@pytest.mark.gate
def test_the_default_policy_still_takes_one_approval(client, world):
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    body = decide(client, world, approval_id, "carol").get_json()
    assert (body["status"], body["approvals_required"], body["approvals_count"]) == (
        "approved",
        1,
        1,
    )
    assert len(body["votes"]) == 1


# ---- concurrency (PostgreSQL: row locks, separate connections) ---------------------------------


def decide_together(app: Flask, world: World, approval_id: int, who: list[str]) -> list[int]:
    """Each human decides on their own connection, all released at once by a barrier."""
    barrier = threading.Barrier(len(who))
    statuses: dict[int, int] = {}

    def vote(index: int, name: str) -> None:
        client = app.test_client()
        barrier.wait(timeout=30)
        statuses[index] = decide(client, world, approval_id, name).status_code

    threads = [threading.Thread(target=vote, args=pair) for pair in enumerate(who)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return sorted(statuses.values())


@pytest.mark.postgres_only
@pytest.mark.parametrize("round_", range(5))
def test_two_approvers_at_once_approve_exactly_once(two_of_three, world, round_):
    client = two_of_three.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert decide_together(two_of_three, world, approval_id, ["carol", "alice"]) == [200, 200]
    detail = read(client, world, approval_id)
    assert (detail["status"], detail["approvals_count"]) == ("approved", 2)
    assert [e["kind"] for e in detail["events"]] == ["created", "voted", "approved"]
    assert len(vote_rows(two_of_three, approval_id)) == 2
    with two_of_three.app_context():
        assert audit.verify().ok


@pytest.mark.postgres_only
def test_three_approvers_at_once_on_two_of_three(two_of_three, world):
    client = two_of_three.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    statuses = decide_together(two_of_three, world, approval_id, ["carol", "mallory", "alice"])
    assert statuses == [200, 200, 409]  # the third finds it already approved
    assert len(vote_rows(two_of_three, approval_id)) == 2
    assert len([e for e in events(two_of_three, "approved") if e.approval_id == approval_id]) == 1


@pytest.mark.postgres_only
def test_the_same_approver_clicking_twice_at_once_counts_once(two_of_three, world):
    client = two_of_three.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    assert decide_together(two_of_three, world, approval_id, ["carol", "carol"]) == [200, 409]
    assert vote_rows(two_of_three, approval_id) == [("carol", "approve", 0)]
    assert read(client, world, approval_id)["status"] == "pending"


@pytest.mark.postgres_only
def test_many_requests_decided_concurrently_keep_the_chain_intact(two_of_three, world):
    client = two_of_three.test_client()
    names = [f"S{i}" for i in range(6)]
    add_secrets(client, world, names)
    ids = [
        pending_id(client.delete(secret_url(world, name), headers=world.auth("agent")))
        for name in names
    ]
    barrier = threading.Barrier(len(ids) * 2)
    failures: list[int] = []

    def vote(approval_id: int, who: str) -> None:
        local = two_of_three.test_client()
        barrier.wait(timeout=30)
        status = decide(local, world, approval_id, who).status_code
        if status != 200:
            failures.append(status)

    threads = [
        threading.Thread(target=vote, args=(approval_id, who))
        for approval_id in ids
        for who in ("carol", "alice")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    with two_of_three.app_context():
        approved = db.session.execute(
            select(func.count()).select_from(ApprovalVote).where(ApprovalVote.decision == "approve")
        ).scalar_one()
        assert approved == 2 * len(ids)
        status = audit.verify()
        assert status.ok, status.message
    assert all(read(client, world, i)["status"] == "approved" for i in ids)
