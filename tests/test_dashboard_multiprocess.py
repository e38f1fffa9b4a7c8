"""Across processes: a request created through one gunicorn reaches a dashboard socket on another.

Two separate gunicorn servers (gthread workers), one PostgreSQL: the event travels by
LISTEN/NOTIFY, not through memory.
"""

from __future__ import annotations

import pytest

from tests.e2e.gunicorn import Gunicorn
from tests.e2e.support import agent_delete_secret, login_session, open_ws, receive_until

pytestmark = pytest.mark.postgres_only


def test_event_from_one_process_reaches_a_socket_on_another(migrated, world):
    if not migrated.startswith("postgres"):
        pytest.skip("LISTEN/NOTIFY needs PostgreSQL")
    with Gunicorn(migrated) as first, Gunicorn(migrated) as second:
        ws = open_ws(second.url, login_session(second.url, "carol", world.password))
        try:
            receive_until(ws, lambda m: 'id="pending-count"' in m)  # the opening resync
            response = agent_delete_secret(
                first.url, world.tokens["agent"], world.ws["api"], "DB_PASSWORD"
            )
            assert response.status_code == 202
            approval_id = response.json()["approval_id"]
            seen = receive_until(ws, lambda m: f'id="approval-{approval_id}"' in m)
            assert 'hx-swap-oob="afterbegin:#pending-rows"' in seen[-1] or (
                'hx-swap-oob="innerHTML"' in seen[-1]  # or a resync that already holds it
            )
        finally:
            ws.close()
        # ... and a decision made on the second reaches a socket on the first.
        ws = open_ws(first.url, login_session(first.url, "alice", world.password))
        try:
            receive_until(ws, lambda m: f'id="approval-{approval_id}"' in m)
            carol = login_session(second.url, "carol", world.password)
            page = carol.get(f"{second.url}/").text
            from tests.e2e.support import csrf_from

            carol.post(
                f"{second.url}/approvals/{approval_id}/decision",
                data={"decision": "approve", "csrf_token": csrf_from(page)},
                timeout=10,
            )
            receive_until(ws, lambda m: f'id="approval-{approval_id}" hx-swap-oob="delete"' in m)
        finally:
            ws.close()
