"""Flask commands: users, tokens, policy, audit, demo seed, and the periodic worker."""

from __future__ import annotations

import time

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import select

from . import audit, outbox
from . import worker as jobs
from .auth import hash_password, issue_token
from .extensions import db
from .models import Membership, Role, TokenKind, User, Workspace
from .policy_file import EffectivePolicy, PolicyError, load_policy

users_cli = AppGroup("users", help="Manage human users.")
tokens_cli = AppGroup("tokens", help="Issue API tokens.")
policy_cli = AppGroup("policy", help="Inspect the gated-action policy.")
audit_cli = AppGroup("audit", help="Verify and export the tamper-evident event log.")


@users_cli.command("create")
@click.argument("name")
@click.option("--password", required=True, help="The user's dashboard password.")
def create_user(name: str, password: str) -> None:
    """Create a user who can log in to the dashboard."""
    if db.session.execute(select(User).where(User.username == name)).scalar_one_or_none():
        raise click.ClickException(f"user {name!r} already exists")
    user = User(username=name, password_hash=hash_password(password))
    db.session.add(user)
    db.session.commit()
    click.echo(f"created user {name} (id {user.id})")


@tokens_cli.command("issue")
@click.option("--kind", type=click.Choice([k.value for k in TokenKind]), required=True)
@click.option("--name", required=True, help="A label for humans, e.g. 'platform-agent'.")
@click.option(
    "--user",
    "username",
    help="The user a 'user' token belongs to, or the human who owns an 'agent' token.",
)
@click.option("--workspace", "workspace_id", type=int, help="Scope the token to this subtree.")
def issue_token_command(
    kind: str, name: str, username: str | None, workspace_id: int | None
) -> None:
    """Issue a token; its plaintext is the last line of output, shown once."""
    user = None
    if username:
        user = db.session.execute(
            select(User).where(User.username == username)
        ).scalar_one_or_none()
        if user is None:
            raise click.ClickException(f"no user {username!r}")
    if kind == TokenKind.USER.value and user is None:
        raise click.ClickException("a user token needs --user")
    if workspace_id is not None and db.session.get(Workspace, workspace_id) is None:
        raise click.ClickException(f"no workspace {workspace_id}")
    token, plaintext = issue_token(kind, name, user=user, workspace_id=workspace_id)
    db.session.commit()
    click.echo(f"issued {kind} token {name!r} (id {token.id}, prefix {token.prefix})")
    click.echo(plaintext)


@policy_cli.command("show")
def policy_show() -> None:
    """Print the effective policy: the built-in map as tuned by COUNTERSIGN_POLICY, if set."""
    effective: EffectivePolicy = current_app.extensions["countersign_policy"]
    rows = effective.table()
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    click.echo("  ".join(h.ljust(widths[h]) for h in headers))
    for row in rows:
        click.echo("  ".join(row[h].ljust(widths[h]) for h in headers))
    subtree_rules = effective.subtree_rules()
    if subtree_rules:
        click.echo("")
        click.echo("subtree rules (the nearest subtree wins):")
        for line in subtree_rules:
            click.echo(f"  {line}")
    click.echo("")
    click.echo(f"source: {effective.source}; version {effective.version}")


@policy_cli.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def policy_check(path: str) -> None:
    """Validate a policy file against the built-in map; exit non-zero with the first error."""
    try:
        effective = load_policy(path)
    except PolicyError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{path}: ok ({len(effective.rules)} rule(s), version {effective.version})")


@audit_cli.command("verify")
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Walk the event hash chain; exit non-zero naming the first broken event."""
    status = audit.verify()
    click.echo(status.message, err=not status.ok)
    if not status.ok:
        ctx.exit(1)


@audit_cli.command("export")
@click.option(
    "--output", "-o", type=click.File("w"), default="-", help="File to write (default stdout)."
)
def audit_export(output) -> None:
    """Write every event, with its hashes, as JSON Lines, oldest first."""
    count = audit.export(output)
    click.echo(f"exported {count} event(s)", err=True)


@click.command("seed-demo")
@with_appcontext
@click.option("--password", default="countersign-demo", show_default=True)
def seed_demo(password: str) -> None:
    """Seed a small workspace tree, an approver, a viewer and an agent token (idempotent)."""
    if db.session.execute(select(User).where(User.username == "alice")).scalar_one_or_none():
        click.echo("demo already seeded (users alice, bob; password unchanged)")
        return
    acme = Workspace(name="acme")
    db.session.add(acme)
    db.session.flush()
    prod = Workspace(name="production", parent_id=acme.id)
    staging = Workspace(name="staging", parent_id=acme.id)
    db.session.add_all([prod, staging])
    db.session.flush()
    api = Workspace(name="payments-api", parent_id=prod.id)
    db.session.add(api)
    db.session.flush()
    alice = User(username="alice", password_hash=hash_password(password))
    bob = User(username="bob", password_hash=hash_password(password))
    db.session.add_all([alice, bob])
    db.session.flush()
    db.session.add_all(
        [
            Membership(workspace_id=acme.id, user_id=alice.id, role=Role.OWNER.value),
            Membership(workspace_id=staging.id, user_id=bob.id, role=Role.APPROVER.value),
            Membership(workspace_id=prod.id, user_id=bob.id, role=Role.VIEWER.value),
        ]
    )
    from .models import Secret

    db.session.add(Secret(workspace_id=api.id, name="STRIPE_KEY", value="sk_demo_not_a_real_key"))
    _, plaintext = issue_token(TokenKind.AGENT.value, "platform-agent")
    db.session.commit()
    click.echo("demo seeded:")
    click.echo(
        f"  workspaces: acme (#{acme.id}) > production (#{prod.id}) > payments-api (#{api.id});"
        f" acme > staging (#{staging.id})"
    )
    click.echo(f"  dashboard login: alice / {password}  (owner of acme: approves everything)")
    click.echo(
        f"                   bob / {password}    (approver of staging, viewer of production)"
    )
    click.echo("  trigger a 202 (agent deletes a secret):")
    click.echo(
        f"    curl -i -X DELETE -H 'Authorization: Bearer {plaintext}' "
        f"http://127.0.0.1:5000/api/workspaces/{api.id}/secrets/STRIPE_KEY"
    )
    click.echo("  agent token (shown once):")
    click.echo(plaintext)


@click.command("worker")
@with_appcontext
@click.option("--interval", default=5.0, show_default=True, help="Seconds between runs.")
@click.option("--once", is_flag=True, help="Run the jobs once and exit.")
def worker(interval: float, once: bool) -> None:
    """Run the periodic jobs: expire requests and unused approvals, escalate, deliver webhooks.

    Several workers may run at once: each row is claimed by one of them.
    """
    name = outbox.worker_id()
    while True:
        try:
            report = jobs.run_once(current_app.config, name)
        except Exception:
            if once:
                raise
            current_app.logger.exception("worker run failed; retrying after the interval")
        else:
            for line in report.lines():
                click.echo(line)
        if once:
            return
        time.sleep(interval)  # the pause between runs, not a synchronisation


@click.command("agent-tool")
def agent_tool() -> None:
    """Print the MCP-style tool description for agents (generated from the policy map)."""
    import json

    from .agent_tool import tool_description

    click.echo(json.dumps(tool_description(), indent=2))


def register_cli(app: Flask) -> None:
    for command in (users_cli, tokens_cli, policy_cli, audit_cli, seed_demo, worker, agent_tool):
        app.cli.add_command(command)
