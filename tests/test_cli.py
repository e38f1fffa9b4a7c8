"""The flask commands: users, tokens, policy, the demo seed; their output works against the API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from app.auth import password_matches
from app.extensions import db
from app.models import ApiToken, ApprovalRequest, Membership, Secret, User, Workspace
from app.policy import POLICY

ROOT = Path(__file__).resolve().parent.parent


def counts(app) -> dict[str, int]:
    with app.app_context():
        return {
            model.__name__: db.session.execute(select(func.count()).select_from(model)).scalar()
            for model in (User, Workspace, Membership, Secret, ApiToken)
        }


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_users_create(app, runner):
    result = runner.invoke(args=["users", "create", "zoe", "--password", "s3cret-pw"])
    assert result.exit_code == 0, result.output
    assert "created user zoe" in result.output
    with app.app_context():
        user = db.session.execute(select(User).where(User.username == "zoe")).scalar_one()
        assert user.password_hash != "s3cret-pw"
        assert password_matches(user, "s3cret-pw")
        assert not password_matches(user, "wrong")

    again = runner.invoke(args=["users", "create", "zoe", "--password", "other"])
    assert again.exit_code != 0
    assert "already exists" in again.output


def test_users_create_needs_a_password(runner):
    result = runner.invoke(args=["users", "create", "nopw"])
    assert result.exit_code == 2
    assert "--password" in result.output


def test_issued_service_token_works_against_the_api(app, runner, client):
    result = runner.invoke(args=["tokens", "issue", "--kind", "service", "--name", "ops"])
    assert result.exit_code == 0, result.output
    token = last_line(result.output)
    assert token.startswith("cs_service_")
    assert "ops" in result.output.splitlines()[0]
    with app.app_context():  # stored hashed, never in clear
        stored = db.session.execute(select(ApiToken).where(ApiToken.name == "ops")).scalar_one()
        assert stored.token_hash != token
        assert token.startswith(stored.prefix)

    created = client.post("/api/workspaces", json={"name": "from-cli"}, headers=bearer(token))
    assert created.status_code == 201
    listed = client.get("/api/workspaces", headers=bearer(token))
    assert [w["name"] for w in listed.get_json()["workspaces"]] == ["from-cli"]


def test_issued_scoped_agent_token_is_gated_and_scoped(app, runner, client, world):
    result = runner.invoke(
        args=[
            "tokens",
            "issue",
            "--kind",
            "agent",
            "--name",
            "staging-bot",
            "--workspace",
            str(world.ws["staging"]),
        ]
    )
    assert result.exit_code == 0, result.output
    token = last_line(result.output)
    outside = client.delete(f"/api/workspaces/{world.ws['api']}", headers=bearer(token))
    assert outside.status_code == 403
    inside = client.delete(f"/api/workspaces/{world.ws['staging']}", headers=bearer(token))
    assert inside.status_code == 202
    assert inside.get_json()["action"] == "workspace.delete"


def test_issued_user_token_decides(runner, client, world):
    result = runner.invoke(
        args=["tokens", "issue", "--kind", "user", "--name", "alice-laptop", "--user", "alice"]
    )
    assert result.exit_code == 0, result.output
    token = last_line(result.output)
    asked = client.delete(f"/api/workspaces/{world.ws['api']}", headers=world.auth("agent"))
    decided = client.post(
        f"/api/approvals/{asked.get_json()['approval_id']}/decision",
        json={"decision": "approve"},
        headers=bearer(token),
    )
    assert decided.status_code == 200
    assert decided.get_json()["decided_by"] == "alice"


def test_tokens_issue_refuses_bad_arguments(app, runner, world):
    before = counts(app)
    for args, message in (
        (["--kind", "user", "--name", "u"], "needs --user"),
        (["--kind", "user", "--name", "u", "--user", "nobody"], "no user"),
        (["--kind", "agent", "--name", "a", "--workspace", "99999"], "no workspace"),
        (["--kind", "root", "--name", "r"], "root"),
    ):
        result = runner.invoke(args=["tokens", "issue", *args])
        assert result.exit_code != 0, args
        assert message in result.output, result.output
    assert counts(app) == before


def test_policy_show_lists_every_action(runner):
    result = runner.invoke(args=["policy", "show"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "action"
    listed = {line.split()[0] for line in lines[1:] if line.strip()}
    assert listed >= set(POLICY)
    assert len(POLICY) == 6
    delete = next(line for line in lines if line.startswith("workspace.delete")).split()
    assert {"agent", "24h", "15min"} <= set(delete)


def test_seed_demo_is_idempotent(app, runner, client):
    first = runner.invoke(args=["seed-demo", "--password", "demo-pw"])
    assert first.exit_code == 0, first.output
    assert "demo seeded" in first.output
    seeded = counts(app)
    assert seeded == {"User": 2, "Workspace": 4, "Membership": 3, "Secret": 1, "ApiToken": 1}

    second = runner.invoke(args=["seed-demo"])
    assert second.exit_code == 0, second.output
    assert "already seeded" in second.output
    assert counts(app) == seeded

    # The printed agent token works, and is gated.
    token = last_line(first.output)
    with app.app_context():
        secret = db.session.execute(select(Secret)).scalar_one()
    asked = client.delete(
        f"/api/workspaces/{secret.workspace_id}/secrets/{secret.name}", headers=bearer(token)
    )
    assert asked.status_code == 202
    with app.app_context():
        alice = db.session.execute(select(User).where(User.username == "alice")).scalar_one()
        assert password_matches(alice, "demo-pw")
        assert db.session.execute(select(func.count()).select_from(ApprovalRequest)).scalar() == 1


def test_worker_once_with_nothing_due(runner):
    result = runner.invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_real_flask_command_line(app, client):
    """`flask --app wsgi ...` as an operator runs it, against the test database."""
    env = {
        **os.environ,
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        "SECRET_KEY": "cli-test",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "wsgi",
            "tokens",
            "issue",
            "--kind",
            "service",
            "--name",
            "from-shell",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    token = last_line(result.stdout)
    assert client.get("/api/tokens", headers=bearer(token)).status_code == 200
