"""Idempotency-Key on gated routes, the client's 2-of-N progress, the agents' tool description."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from conftest import LiveServer

from countersign_client import CountersignClient

pytestmark = pytest.mark.gate


def test_same_idempotency_key_same_request_reuses_the_approval(client, world):
    url = f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"
    headers = {**world.auth("agent"), "Idempotency-Key": "delete-db-password-1"}
    first = client.delete(url, headers=headers)
    again = client.delete(url, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json["approval_id"] == again.json["approval_id"]


def test_same_idempotency_key_different_request_is_422(client, world):
    headers = {**world.auth("agent"), "Idempotency-Key": "k-1"}
    first = client.delete(f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD", headers=headers)
    assert first.status_code == 202
    other = client.delete(f"/api/workspaces/{world.ws['staging']}", headers=headers)
    assert other.status_code == 422
    assert other.json["error"] == "idempotency_key_reused"
    # Another agent may use the same key for its own request: keys are per caller.
    mine = client.delete(
        f"/api/workspaces/{world.ws['staging']}",
        headers={**world.auth("agent_y"), "Idempotency-Key": "k-1"},
    )
    assert mine.status_code == 202


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_idempotency_keys_are_400(client, world, key):
    response = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD",
        headers={**world.auth("agent"), "Idempotency-Key": key},
    )
    assert response.status_code == 400


TWO_OF_N = """
[actions."workspace.delete"]
approvals_required = 2
"""


@pytest.fixture
def two_of_n_server(world, policy_apps) -> Iterator[LiveServer]:
    tuned = policy_apps.build(TWO_OF_N)
    with LiveServer(tuned) as server:
        server.app = tuned
        yield server


def test_the_client_reports_progress_on_a_two_of_n_request(two_of_n_server, world):
    app = two_of_n_server.app
    humans = app.test_client()
    lines: list[str] = []
    waiting = threading.Event()
    one_of_two = threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting for approval #"):
            waiting.set()
        if "(1 of 2)" in line:
            one_of_two.set()

    agent = CountersignClient(
        two_of_n_server.url, world.tokens["agent"], on_progress=progress, max_wait=30
    )
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            response=agent.call("DELETE", f"/api/workspaces/{world.ws['staging']}")
        )
    )
    thread.start()
    assert waiting.wait(10)
    [pending] = humans.get("/api/approvals?status=pending", headers=world.auth("alice")).json[
        "approvals"
    ]
    decide = f"/api/approvals/{pending['id']}/decision"
    body = {"decision": "approve", "reason": "ok"}
    assert humans.post(decide, json=body, headers=world.auth("alice")).status_code == 200
    assert one_of_two.wait(10), lines  # the long-poll woke on the vote and reported it
    assert humans.post(decide, json=body, headers=world.auth("dave")).status_code == 200
    thread.join(30)
    assert outcome["response"].status == 204
    assert any("(1 of 2)" in line for line in lines)


def test_agent_tool_description_comes_from_the_policy_map(runner):
    result = runner.invoke(args=["agent-tool"])
    assert result.exit_code == 0
    tool = json.loads(result.output)
    assert tool["name"] == "countersign_api"
    assert "202" in tool["description"] and "wait" in tool["description"]
    for action in ("workspace.delete", "secret.delete", "token.mint", "member.remove"):
        assert action in tool["description"]
        assert action in tool["x-countersign-gated-actions"]
    assert "DELETE /api/workspaces/{workspace_id}" in tool["description"]
    assert tool["inputSchema"]["required"] == ["method", "path"]
