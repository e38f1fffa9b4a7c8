"""Regression: the gate keeps working once psycopg prepares its statements (the 6th run).

PostgreSQL's generic plan for a prepared ``INSERT ... ON CONFLICT (...) WHERE status = $1`` cannot
match the partial unique index, so a bound predicate made every 11th new request a 503.
"""

from __future__ import annotations

import pytest

from app.extensions import db
from app.models import Secret

pytestmark = [pytest.mark.gate]


def test_many_first_requests_in_a_row_all_get_202(app, client, world):
    with app.app_context():
        db.session.add_all(
            Secret(workspace_id=world.ws["api"], name=f"S{n}", value="v") for n in range(15)
        )
        db.session.commit()
    statuses = [
        client.delete(
            f"/api/workspaces/{world.ws['api']}/secrets/S{n}", headers=world.auth("agent")
        ).status_code
        for n in range(15)
    ]
    assert statuses == [202] * 15
    # And retries of each (consume miss + pending lookup, also prepared by now) still answer 202.
    again = [
        client.delete(
            f"/api/workspaces/{world.ws['api']}/secrets/S{n}", headers=world.auth("agent")
        ).status_code
        for n in range(15)
    ]
    assert again == [202] * 15
