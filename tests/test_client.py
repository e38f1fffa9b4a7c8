"""The Python client against a live server: it blocks on 202, waits, re-sends, returns."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from countersign_client import ApprovalDenied, CountersignClient

ROOT = Path(__file__).resolve().parents[1]


class Progress:
    """Collects the client's progress lines and signals when it starts waiting."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting = threading.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("waiting for approval #"):
            self.waiting.set()


def run_in_thread(call) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["response"] = call()
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def pending_id(client, world) -> int:
    approvals = client.get("/api/approvals?status=pending", headers=world.auth("alice")).json
    (approval,) = approvals["approvals"]
    return approval["id"]


def test_call_blocks_until_approved_then_returns_204(client, world, live_server):
    progress = Progress()
    agent = CountersignClient(
        live_server.url, world.tokens["agent"], on_progress=progress, max_wait=30
    )
    thread, outcome = run_in_thread(
        lambda: agent.call("DELETE", f"/api/workspaces/{world.ws['staging']}")
    )
    assert progress.waiting.wait(10)
    assert "error" not in outcome and "response" not in outcome  # still blocked
    decision = client.post(
        f"/api/approvals/{pending_id(client, world)}/decision",
        json={"decision": "approve", "reason": "fine"},
        headers=world.auth("alice"),
    )
    assert decision.status_code == 200
    thread.join(30)
    assert outcome["response"].status == 204
    assert (
        client.get(
            f"/api/workspaces/{world.ws['staging']}", headers=world.auth("service")
        ).status_code
        == 404
    )
    assert any("granted" in line for line in progress.lines)


def test_denial_raises_with_the_reason(client, world, live_server):
    progress = Progress()
    agent = CountersignClient(
        live_server.url, world.tokens["agent"], on_progress=progress, max_wait=30
    )
    thread, outcome = run_in_thread(
        lambda: agent.call("DELETE", f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD")
    )
    assert progress.waiting.wait(10)
    client.post(
        f"/api/approvals/{pending_id(client, world)}/decision",
        json={"decision": "deny", "reason": "that is the production password"},
        headers=world.auth("carol"),
    )
    thread.join(30)
    assert isinstance(outcome["error"], ApprovalDenied)
    assert outcome["error"].reason == "that is the production password"
    # A later identical call learns the answer at once, without a new request.
    with pytest.raises(ApprovalDenied):
        agent.call("DELETE", f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD")


def test_ungated_calls_pass_straight_through(world, live_server):
    service = CountersignClient(live_server.url, world.tokens["service"])
    response = service.call("DELETE", f"/api/workspaces/{world.ws['api']}/secrets/DB_PASSWORD")
    assert response.status == 204


def test_command_line_waits_and_reports_progress(client, world, live_server):
    env = {
        **os.environ,
        "COUNTERSIGN_URL": live_server.url,
        "COUNTERSIGN_TOKEN": world.tokens["agent"],
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "countersign_client",
            "DELETE",
            f"/api/workspaces/{world.ws['staging']}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first_line = process.stderr.readline()  # blocks until the client is waiting
        assert first_line.startswith("waiting for approval #")
        client.post(
            f"/api/approvals/{pending_id(client, world)}/decision",
            json={"decision": "approve", "reason": "ok"},
            headers=world.auth("alice"),
        )
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "HTTP 204" in rest


def test_client_imports_without_flask():
    code = "import sys; import countersign_client; assert 'flask' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
