"""The live feed without sockets: per-user filtering, the fragments, the snapshot cache."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import events
from app.auth import caller_from_user
from app.dashboard.live import Feed, LiveView, SnapshotCache
from app.dashboard.rows import Snapshot
from app.extensions import db
from app.models import ApprovalEvent, User, utcnow


def caller(name: str):
    user = db.session.execute(select(User).where(User.username == name)).scalar_one()
    return caller_from_user(user)


def last_change(approval_id: int) -> events.ApprovalChange:
    entry = db.session.execute(
        select(ApprovalEvent)
        .where(ApprovalEvent.approval_id == approval_id)
        .order_by(ApprovalEvent.id.desc())
        .limit(1)
    ).scalar_one()
    return events.ApprovalChange(approval_id, entry.id, entry.kind)


@pytest.fixture
def ask(client, world):
    def make(workspace: str = "api", name: str = "DB_PASSWORD") -> int:
        response = client.delete(
            f"/api/workspaces/{world.ws[workspace]}/secrets/{name}", headers=world.auth("agent")
        )
        assert response.status_code == 202
        return response.get_json()["approval_id"]

    return make


@pytest.fixture
def decide_api(client, world):
    def make(approval_id: int, who: str, decision: str, reason: str | None = None) -> None:
        response = client.post(
            f"/api/approvals/{approval_id}/decision",
            json={"decision": decision, "reason": reason},
            headers=world.auth(who),
        )
        assert response.status_code == 200, response.get_json()

    return make


def test_a_new_request_reaches_only_the_users_who_may_see_it(app, world, ask):
    with app.test_request_context():
        feeds = {name: Feed(caller(name), LiveView("pending")) for name in world_users()}
        for feed in feeds.values():
            feed.resync(utcnow())
        approval_id = ask()
        change = last_change(approval_id)
        sent = {name: feed.apply([change], utcnow()) for name, feed in feeds.items()}
    for name in ("alice", "carol", "victor"):
        assert f'id="approval-{approval_id}"' in sent[name]
        assert 'hx-swap-oob="afterbegin:#pending-rows"' in sent[name]
    for name in ("dave", "mallory"):
        assert sent[name] == "", name
    assert 'id="pending-count"' in sent["carol"] and 'data-count="1"' in sent["carol"]
    assert 'id="pending-count"' not in sent["victor"]  # a viewer's count does not move
    assert "/decision" in sent["carol"] and "/decision" not in sent["victor"]
    assert "Escalation · via acme" in sent["alice"]


def world_users() -> list[str]:
    return ["alice", "carol", "dave", "victor", "mallory"]


def test_a_decision_removes_the_row_and_tells_the_others(app, world, ask, decide_api):
    approval_id = ask()
    with app.test_request_context():
        carol = Feed(caller("carol"), LiveView("pending"))
        alice = Feed(caller("alice"), LiveView("other"))
        assert f'id="approval-{approval_id}"' in carol.resync(utcnow())
        alice.resync(utcnow())
        decide_api(approval_id, "carol", "deny", "not now")
        change = last_change(approval_id)
        to_carol = carol.apply([change], utcnow())
        to_alice = alice.apply([change], utcnow())
    assert f'<div id="approval-{approval_id}" hx-swap-oob="delete"></div>' in to_carol
    assert 'data-count="0"' in to_carol
    assert "notice" not in to_carol  # carol decided it herself
    assert "was denied by carol" in to_alice and "not now" in to_alice
    assert 'hx-swap-oob="delete"' not in to_alice  # alice's page holds no list
    assert 'data-count="0"' in to_alice


def test_replayed_changes_are_idempotent(app, world, ask):
    approval_id = ask()
    with app.test_request_context():
        feed = Feed(caller("carol"), LiveView("pending"))
        feed.resync(utcnow())  # already shows the row
        again = feed.apply([last_change(approval_id)], utcnow())
    assert f'id="approval-{approval_id}"' in again
    assert "afterbegin" not in again and 'hx-swap-oob="true"' in again


def test_resync_change_sends_the_whole_list(app, world, ask):
    approval_id = ask()
    with app.test_request_context():
        feed = Feed(caller("carol"), LiveView("pending"))
        message = feed.apply([events.RESYNC], utcnow())
    assert '<div id="pending-rows" class="approvals" hx-swap-oob="innerHTML">' in message
    assert f'id="approval-{approval_id}"' in message and 'data-count="1"' in message


def test_rows_leave_when_their_deadline_passes(app, world, ask):
    approval_id = ask()
    with app.test_request_context():
        feed = Feed(caller("carol"), LiveView("pending"))
        now = utcnow()
        feed.resync(now)
        deadline = feed.seconds_to_next_deadline(now)
        assert deadline is not None and deadline > 3600
        assert feed.expire_due(now) == []
        parts = "".join(feed.expire_due(now + timedelta(days=2)))
    assert f'id="approval-{approval_id}" hx-swap-oob="delete"' in parts
    assert "expired without a decision" in parts and 'data-count="0"' in parts


def test_detail_view_gets_its_panel_refreshed(app, world, ask, decide_api):
    approval_id = ask()
    with app.test_request_context():
        feed = Feed(caller("victor"), LiveView("detail", approval_id))
        assert f'id="approval-detail-{approval_id}"' in feed.resync(utcnow())
        decide_api(approval_id, "carol", "approve")
        message = feed.apply([last_change(approval_id)], utcnow())
    assert f'id="approval-detail-{approval_id}" class="panel detail-state" hx-swap-oob' in message
    assert "approved" in message
    assert "pending-rows" not in message


def test_live_view_parsing():
    assert LiveView.from_args({"view": "pending"}) == LiveView("pending")
    assert LiveView.from_args({"view": "nonsense"}) == LiveView("other")


def test_hub_subscription_carries_committed_changes(app, world, ask):
    """The real path: a committed change reaches a hub subscriber (NOTIFY on PostgreSQL)."""
    publisher = events.publisher_of(app)
    with publisher.hub.subscribe() as subscription:
        assert publisher.start_listening()
        approval_id = ask()
        change = subscription.get(timeout=10)
        while change is not None and change.kind == events.RESYNC.kind:
            change = subscription.get(timeout=10)  # the listener's own "(re)connected" signal
    assert change is not None and change.approval_id == approval_id
    assert change.kind == "created"


def test_snapshot_cache_loads_once_for_many_waiters():
    cache = SnapshotCache(size=4)
    release = threading.Event()
    loads = []

    def load():
        loads.append(1)
        release.wait(5)
        return "snapshot"

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get((1, 1), load))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(5)
    assert loads == [1] and results == ["snapshot"] * 8
    for event_id in range(2, 10):
        cache.get((1, event_id), lambda: None)
    assert len(cache) == 4


def test_snapshot_cache_forgets_a_failed_load():
    cache = SnapshotCache()

    def boom():
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        cache.get((1, 1), boom)
    assert cache.get((1, 1), lambda: "fresh") == "fresh"


def test_snapshot_names_the_escalating_ancestor():
    now = utcnow()
    row = Snapshot(
        1, 4, "secret.delete", "s", ({"id": 1, "name": "acme"}, {"id": 4, "name": "api"}),
        "agent", "a", "pending", now, now, None, None, None, None, ((4, 0), (1, 1)),
    )  # fmt: skip
    assert row.ancestor_name(1) == "acme" and row.ancestor_name(0) == "api"
    assert row.ancestor_name(5) is None


def test_sockets_of_one_process_share_one_read_per_change(app, world, ask, monkeypatch):
    import app.dashboard.live as live

    loads = []
    real = live.snapshot
    monkeypatch.setattr(live, "snapshot", lambda *a: loads.append(a) or real(*a))
    approval_id = ask()
    with app.test_request_context():
        cache = SnapshotCache()
        feeds = [Feed(caller(name), LiveView("pending"), cache) for name in world_users()]
        change = last_change(approval_id)
        sent = [feed.apply([change], utcnow()) for feed in feeds]
    assert len(loads) == 1
    assert sum(f'id="approval-{approval_id}"' in message for message in sent) == 3


def test_open_sockets_count_and_wait():
    from app.dashboard.live import OpenSockets

    sockets = OpenSockets()
    assert sockets.wait_closed(timeout=0)
    entered, leave = threading.Event(), threading.Event()

    def handler():
        with sockets.track():
            entered.set()
            leave.wait(5)

    thread = threading.Thread(target=handler)
    thread.start()
    assert entered.wait(5) and sockets.count == 1
    assert not sockets.wait_closed(timeout=0)
    leave.set()
    assert sockets.wait_closed(timeout=5) and sockets.count == 0
    thread.join(5)


def test_a_vote_updates_the_row_in_place(app, world, ask, decide_api):
    from app.models import ApprovalRequest

    approval_id = ask()
    with app.app_context():
        db.session.get(ApprovalRequest, approval_id).approvals_required = 2
        db.session.commit()
    with app.test_request_context():
        alice = Feed(caller("alice"), LiveView("pending"))
        carol = Feed(caller("carol"), LiveView("pending"))
        alice.resync(utcnow())
        carol.resync(utcnow())
        decide_api(approval_id, "carol", "approve")
        change = last_change(approval_id)
        assert change.kind == "voted"
        to_alice = alice.apply([change], utcnow())
        to_carol = carol.apply([change], utcnow())
    assert f'id="approval-{approval_id}"' in to_alice and 'hx-swap-oob="true"' in to_alice
    assert "1 of 2 approvals" in to_alice and 'value="approve"' in to_alice
    assert "You approved" in to_carol and 'value="approve"' not in to_carol
