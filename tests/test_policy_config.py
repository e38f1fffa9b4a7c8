"""The policy file: validated against the built-in floor, resolved per action and subtree."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import make_app
from depth_support import PolicyApps, add_member, decide, pending_id, read, secret_url
from sqlalchemy import select

from app.extensions import db
from app.models import ApprovalRequest
from app.policy import POLICY
from app.policy_file import PolicyError, builtin_policy, load_policy, parse_duration, parse_policy

pytestmark = pytest.mark.gate

# acme (1) > prod (2) > api (4); acme > staging (3), nearest first as the gate passes it.
API = [(4, "api"), (2, "prod"), (1, "acme")]
STAGING = [(3, "staging"), (1, "acme")]

TUNED = """
[actions."secret.delete"]
approvals_required = 2
forbid_requester_owner = true

[[rules]]
workspace = "acme/prod"
approvals_required = 3
escalate_after = "30min"

[[rules]]
workspace = 4
actions = ["secret.delete"]
approval_ttl = "5min"
reason_required = ["approve", "deny"]

[[rules]]
actions = ["workspace.delete"]
gated_kinds = ["agent", "service"]
"""


@pytest.fixture
def policy_apps(app, tmp_path: Path) -> Iterator[PolicyApps]:
    apps = PolicyApps(app.config["SQLALCHEMY_DATABASE_URI"], tmp_path)
    yield apps
    apps.close()


# ---- parsing and resolving, without an app -----------------------------------------------------


def test_without_a_file_the_built_in_map_is_the_policy():
    policy = load_policy(None)
    assert policy.source == "built-in"
    for action, entry in POLICY.items():
        assert policy.resolve(action, API) is entry
    assert len(policy.version) == 12
    assert builtin_policy().version == policy.version


def test_rules_apply_by_action_then_subtree_nearest_last():
    policy = parse_policy(__import__("tomllib").loads(TUNED))
    in_api = policy.resolve("secret.delete", API)
    assert in_api.approvals_required == 3  # acme/prod beats the action table
    assert in_api.escalate_after == timedelta(minutes=30)
    assert in_api.approval_ttl == timedelta(minutes=5)  # workspace 4 only
    assert in_api.reason_required == {"approve", "deny"}
    assert in_api.forbid_requester_owner
    assert in_api.summary == POLICY["secret.delete"].summary

    in_staging = policy.resolve("secret.delete", STAGING)
    assert in_staging.approvals_required == 2
    assert in_staging.escalate_after is None
    assert in_staging.approval_ttl == POLICY["secret.delete"].approval_ttl

    assert policy.resolve("member.remove", STAGING) is POLICY["member.remove"]
    assert policy.resolve("member.remove", API).approvals_required == 3
    assert policy.resolve("workspace.delete", STAGING).gates("service")
    assert not policy.resolve("secret.delete", STAGING).gates("service")


def test_a_path_rule_matches_its_whole_subtree_and_nothing_else():
    policy = parse_policy({"rules": [{"workspace": "acme / prod", "approvals_required": 2}]})
    assert policy.resolve("token.revoke", [(2, "prod"), (1, "acme")]).approvals_required == 2
    assert policy.resolve("token.revoke", API).approvals_required == 2
    assert policy.resolve("token.revoke", [(9, "prod")]).approvals_required == 1  # not acme/prod
    assert policy.resolve("token.revoke", [(1, "acme")]).approvals_required == 1


def test_the_version_follows_the_document():
    one = parse_policy({"actions": {"secret.delete": {"approvals_required": 2}}})
    same = parse_policy({"actions": {"secret.delete": {"approvals_required": 2}}})
    other = parse_policy({"actions": {"secret.delete": {"approvals_required": 3}}})
    assert one.version == same.version
    assert len({one.version, other.version, builtin_policy().version}) == 3


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"actions": {"secret.shred": {"approvals_required": 2}}}, "unknown action 'secret.shred'"),
        ({"rules": [{"actions": ["nope"], "approvals_required": 2}]}, "unknown action 'nope'"),
        ({"actions": {"secret.delete": {"pending_ttl": "2 weeks"}}}, "is not a duration"),
        ({"actions": {"secret.delete": {"escalate_after": "0s"}}}, "outside 1s to 30 days"),
        ({"actions": {"secret.delete": {"approvals_required": 0}}}, "from 1 to 10"),
        ({"actions": {"secret.delete": {"approvals_required": True}}}, "whole number"),
        ({"actions": {"secret.delete": {"gated_kinds": ["robot"]}}}, "unknown caller kind"),
        ({"actions": {"secret.delete": {"reason_required": ["maybe"]}}}, "'approve' and 'deny'"),
        ({"actions": {"secret.delete": {"quorum": 2}}}, "unknown setting 'quorum'"),
        ({"actions": {"secret.delete": {}}}, "sets nothing"),
        ({"rules": [{"workspace": "", "approvals_required": 2}]}, "rules[1].workspace"),
        ({"defaults": {}}, "unknown key 'defaults'"),
        ({"allow_loosening": "yes"}, "allow_loosening must be true or false"),
    ],
)
def test_invalid_documents_are_refused_with_the_key_named(document, message):
    with pytest.raises(PolicyError) as refused:
        parse_policy(document, source="test.toml")
    assert message in str(refused.value)
    assert "test.toml" in str(refused.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gated_kinds": ["service"]}, "gated_kinds drops agent"),
        ({"approval_ttl": "1h"}, "approval_ttl 1h is longer than the built-in 15min"),
        ({"reason_required": []}, "reason_required drops deny"),
    ],
)
def test_loosening_below_the_built_in_floor_needs_explicit_consent(settings, message):
    with pytest.raises(PolicyError, match="allow_loosening") as refused:
        parse_policy({"rules": [{"workspace": "acme", **settings}]})
    assert message in str(refused.value)
    allowed = parse_policy(
        {"allow_loosening": True, "rules": [{"workspace": "acme", **settings}]}
    ).resolve("secret.delete", API)
    assert allowed != POLICY["secret.delete"]


def test_durations():
    assert parse_duration(90) == timedelta(seconds=90)
    assert parse_duration("15min") == parse_duration("15m") == timedelta(minutes=15)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1d") == timedelta(days=1)
    for bad in ("1w", "-5s", "1.5h", True, None, "31d"):
        with pytest.raises(PolicyError):
            parse_duration(bad)


def test_unreadable_or_malformed_files_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[actions\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(broken)


# ---- at startup and on the command line --------------------------------------------------------


def test_an_invalid_policy_file_stops_the_app_at_startup(migrated, tmp_path):
    path = tmp_path / "loose.toml"
    path.write_text('[actions."token.mint"]\ngated_kinds = []\n')
    with pytest.raises(PolicyError, match=r"gated_kinds drops agent for token\.mint"):
        make_app(migrated, COUNTERSIGN_POLICY=str(path))


def test_policy_check_validates_a_file(runner, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(TUNED)
    result = runner.invoke(args=["policy", "check", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok (4 rule(s), version" in result.output

    bad = tmp_path / "bad.toml"
    bad.write_text('[actions."secret.delete"]\napproval_ttl = "2h"\n')
    result = runner.invoke(args=["policy", "check", str(bad)])
    assert result.exit_code != 0
    assert "approval_ttl 2h is longer than the built-in 15min" in result.output


def test_policy_show_prints_the_effective_policy(policy_apps):
    tuned = policy_apps.build(TUNED)
    result = tuned.test_cli_runner().invoke(args=["policy", "show"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[0] == "action"
    delete = next(line for line in lines if line.startswith("secret.delete")).split()
    assert delete[:3] == ["secret.delete", "agent", "2"]
    assert any("rules[1]: workspace acme / prod, every action" in line for line in lines)
    version = tuned.extensions["countersign_policy"].version
    assert lines[-1].endswith(f"version {version}")
    assert "policy-0.toml" in lines[-1]


# ---- the gate uses the effective policy for (action, workspace chain) -------------------------


def test_a_subtree_rule_tightens_only_that_subtree(app, world, policy_apps):
    tuned = policy_apps.build('[[rules]]\nworkspace = "acme/prod"\napprovals_required = 2\n')
    client = tuned.test_client()
    add_member(client, world, "staging", "carol", "approver")
    client.put(
        secret_url(world, "K", "staging"), json={"value": "v"}, headers=world.auth("service")
    )

    in_prod = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    in_staging = pending_id(
        client.delete(secret_url(world, "K", "staging"), headers=world.auth("agent"))
    )
    assert decide(client, world, in_prod, "carol").get_json()["status"] == "pending"
    assert decide(client, world, in_staging, "carol").get_json()["status"] == "approved"
    assert read(client, world, in_prod)["approvals_required"] == 2
    assert read(client, world, in_staging)["approvals_required"] == 1


def test_each_request_records_the_policy_version_and_terms(app, world, policy_apps):
    tuned = policy_apps.build(TUNED)
    client = tuned.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    version = tuned.extensions["countersign_policy"].version
    assert read(client, world, approval_id)["policy_version"] == version
    with tuned.app_context():
        row = db.session.execute(
            select(ApprovalRequest).where(ApprovalRequest.id == approval_id)
        ).scalar_one()
        assert row.policy_terms["approvals_required"] == 3
        assert row.policy_terms["approval_ttl"] == 300
        assert row.policy_terms["escalate_after"] == 1800

    # The default app records the built-in version: the two differ.
    plain = pending_id(app.test_client().delete(secret_url(world), headers=world.auth("agent_y")))
    assert read(client, world, plain)["policy_version"] == builtin_policy().version != version


def test_the_terms_a_request_was_made_under_survive_a_policy_change(app, world, policy_apps):
    strict = policy_apps.build('[actions."secret.delete"]\napprovals_required = 2\n')
    approval_id = pending_id(
        strict.test_client().delete(secret_url(world), headers=world.auth("agent"))
    )
    # The default app (one approval) decides it: the request still needs its two.
    client = app.test_client()
    assert decide(client, world, approval_id, "carol").get_json()["status"] == "pending"
    assert decide(client, world, approval_id, "alice").get_json()["status"] == "approved"


def test_tightened_gated_kinds_gate_a_service_token(app, world, policy_apps):
    tuned = policy_apps.build('[actions."workspace.delete"]\ngated_kinds = ["agent", "service"]\n')
    response = tuned.test_client().delete(
        f"/api/workspaces/{world.ws['api']}", headers=world.auth("service")
    )
    assert pending_id(response)


def test_reason_required_for_approval_when_the_policy_says_so(app, world, policy_apps):
    tuned = policy_apps.build('[actions."secret.delete"]\nreason_required = ["approve", "deny"]\n')
    client = tuned.test_client()
    approval_id = pending_id(client.delete(secret_url(world), headers=world.auth("agent")))
    refused = decide(client, world, approval_id, "carol")
    assert refused.status_code == 422
    assert refused.get_json()["field"] == "reason"
    assert read(client, world, approval_id)["approvals_count"] == 0
    approved = decide(client, world, approval_id, "carol", reason="rotating the key")
    assert approved.get_json()["status"] == "approved"
    assert approved.get_json()["votes"][0]["reason"] == "rotating the key"
