"""Flask commands: users, tokens, policy, demo seed, and the periodic worker."""

from __future__ import annotations

import time

import click
from flask import Flask
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import select

from . import approvals
from .auth import hash_password, issue_token
from .extensions import db
from .models import Membership, Role, TokenKind, User, Workspace
from .policy import policy_table

users_cli = AppGroup("users", help="Manage human users.")
tokens_cli = AppGroup("tokens", help="Issue API tokens.")
policy_cli = AppGroup("policy", help="Inspect the gated-action policy.")


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
@click.option("--user", "username", help="The user a 'user' token belongs to.")
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
    """Print the gated-action map."""
    rows = policy_table()
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    click.echo("  ".join(h.ljust(widths[h]) for h in headers))
    for row in rows:
        click.echo("  ".join(row[h].ljust(widths[h]) for h in headers))


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
    """Run the periodic jobs: expire pending requests past their deadline."""
    while True:
        expired = approvals.expire_due()
        db.session.commit()
        if expired:
            click.echo(f"expired {expired} request(s)")
        db.session.remove()
        if once:
            return
        time.sleep(interval)


def register_cli(app: Flask) -> None:
    for command in (users_cli, tokens_cli, policy_cli, seed_demo, worker):
        app.cli.add_command(command)
