"""/metrics moves as the gate works, and is not open to the world; gate logs are JSON."""

from __future__ import annotations

import json
import re


def scrape(client, world) -> str:
    response = client.get("/metrics", headers=world.auth("service"))
    assert response.status_code == 200
    return response.get_data(as_text=True)


def value(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_metrics_need_a_service_token(client, world):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=world.auth("agent")).status_code == 403
    assert client.get("/metrics", headers=world.auth("alice")).status_code == 403


def test_metrics_follow_the_gate(client, world):
    path = f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD"
    before = scrape(client, world)
    assert value(before, "countersign_pending_requests", action="secret.delete") == 0

    approval_id = client.delete(path, headers=world.auth("agent")).json["approval_id"]
    client.delete(path, headers=world.auth("agent"))
    after_pending = scrape(client, world)
    assert (
        value(
            after_pending,
            "countersign_gate_outcomes_total",
            action="secret.delete",
            outcome="pending",
        )
        == 2
    )
    assert value(after_pending, "countersign_pending_requests", action="secret.delete") == 1

    client.post(
        f"/api/approvals/{approval_id}/decision",
        json={"decision": "approve", "reason": "ok"},
        headers=world.auth("alice"),
    )
    assert client.delete(path, headers=world.auth("agent")).status_code == 204
    done = scrape(client, world)
    assert (
        value(done, "countersign_gate_outcomes_total", action="secret.delete", outcome="consumed")
        == 1
    )
    assert value(done, "countersign_pending_requests", action="secret.delete") == 0
    assert (
        value(
            done, "countersign_decision_seconds_count", action="secret.delete", decision="approve"
        )
        == 1
    )

    client.delete(f"/api/workspaces/{world.ws['staging']}", headers=world.auth("service"))
    passed = scrape(client, world)
    assert (
        value(
            passed,
            "countersign_gate_outcomes_total",
            action="workspace.delete",
            outcome="passthrough",
        )
        == 1
    )


def test_gate_decisions_are_logged_as_json_without_secrets(client, world, capsys):
    response = client.delete(
        f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD",
        headers={**world.auth("agent"), "X-Request-ID": "req-123"},
    )
    assert response.headers["X-Request-ID"] == "req-123"
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    gate_lines = [line for line in lines if line.get("name") == "countersign.gate"]
    assert gate_lines, lines
    entry = gate_lines[-1]
    assert entry["outcome"] == "pending"
    assert entry["request_id"] == "req-123"
    assert entry["approval_id"] == response.json["approval_id"]
    assert entry["action"] == "secret.delete"
    assert entry["caller_kind"] == "agent"
    raw = json.dumps(lines)
    assert world.tokens["agent"] not in raw
    assert "hunter2" not in raw
