"""app/policy.py on its own: the action map and the pure functions the gate hashes with."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta

import pytest

from app.policy import (
    AGENT,
    POLICY,
    ActionPolicy,
    UnknownActionError,
    canonical_json,
    format_duration,
    keyed_digest,
    policy_for,
    policy_table,
    request_hash,
)

ACTIONS = {
    "workspace.delete",
    "secret.delete",
    "secret.replace",
    "token.mint",
    "token.revoke",
    "member.remove",
}

TARGET = {"workspace_id": 4, "recursive": False, "subtree": [{"id": 4, "name": "api"}]}


def test_the_map_names_the_six_destructive_actions():
    assert set(POLICY) == ACTIONS
    assert all(entry.action == name for name, entry in POLICY.items())


def test_agents_are_gated_by_default_and_no_one_else():
    for entry in POLICY.values():
        assert entry.gates(AGENT)
        assert not entry.gates("service")
        assert not entry.gates("user")


def test_policy_for_unknown_action_raises():
    assert policy_for("secret.delete") is POLICY["secret.delete"]
    with pytest.raises(UnknownActionError, match=r"no\.such"):
        policy_for("no.such")


def test_describe_fills_the_summary_template():
    summary = POLICY["workspace.delete"].describe(
        {"workspace_path": "acme / prod", "recursive_note": " and its 1 descendant(s)"}
    )
    assert summary == "Delete workspace acme / prod and its 1 descendant(s)"
    with pytest.raises(KeyError):
        POLICY["workspace.delete"].describe({})


def test_canonical_json_sorts_keys_at_every_depth():
    document = {"b": 1, "a": {"z": [{"y": 1, "x": 2}], "c": None}}
    assert canonical_json(document) == '{"a":{"c":null,"z":[{"x":2,"y":1}]},"b":1}'
    reordered = {"a": {"c": None, "z": [{"x": 2, "y": 1}]}, "b": 1}
    assert canonical_json(reordered) == canonical_json(document)


def test_canonical_json_keeps_list_order_and_unicode():
    assert canonical_json([3, 1, 2]) == "[3,1,2]"
    assert canonical_json({"name": "Zürich"}) == '{"name":"Zürich"}'


def test_request_hash_is_sha256_of_the_canonical_document():
    expected = hashlib.sha256(
        canonical_json(
            {
                "action": "workspace.delete",
                "workspace_id": 4,
                "target": TARGET,
                "caller": {"token_id": 7},
            }
        ).encode()
    ).hexdigest()
    assert request_hash("workspace.delete", 4, TARGET, 7) == expected


def test_request_hash_ignores_key_order():
    shuffled = dict(reversed(list(TARGET.items())))
    assert request_hash("workspace.delete", 4, shuffled, 7) == request_hash(
        "workspace.delete", 4, TARGET, 7
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"action": "secret.delete"},
        {"workspace_id": 5},
        {"target": {**TARGET, "recursive": True}},
        {"target": {**TARGET, "subtree": [*TARGET["subtree"], {"id": 9, "name": "new"}]}},
        {"caller_token_id": 8},
    ],
    ids=["action", "workspace", "flag", "subtree", "caller"],
)
def test_request_hash_differs_per_action_target_and_caller(changed):
    base = {
        "action": "workspace.delete",
        "workspace_id": 4,
        "target": TARGET,
        "caller_token_id": 7,
    }
    assert request_hash(**{**base, **changed}) != request_hash(**base)


def test_keyed_digest_is_an_hmac_of_the_value():
    digest = keyed_digest("key", "hunter2")
    assert digest == hmac.new(b"key", b"hunter2", hashlib.sha256).hexdigest()
    assert "hunter2" not in digest
    assert digest != hashlib.sha256(b"hunter2").hexdigest()  # unkeyed would be guessable
    assert keyed_digest("other-key", "hunter2") != digest
    assert keyed_digest("key", "hunter3") != digest


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(hours=24), "24h"),
        (timedelta(minutes=15), "15min"),
        (timedelta(seconds=90), "90s"),
        (timedelta(seconds=0), "0s"),
    ],
)
def test_format_duration(delta, text):
    assert format_duration(delta) == text


def test_policy_table_has_a_row_per_action():
    rows = policy_table()
    assert {row["action"] for row in rows} == ACTIONS
    delete = next(row for row in rows if row["action"] == "workspace.delete")
    assert {key: delete[key] for key in ("gated_kinds", "pending_ttl", "approval_ttl")} == {
        "gated_kinds": "agent",
        "pending_ttl": "24h",
        "approval_ttl": "15min",
    }
    assert delete["summary"] == POLICY["workspace.delete"].summary
    json.dumps(rows)  # plain data, printable by the CLI


def test_action_policy_is_immutable():
    entry = ActionPolicy("x.y", "summary")
    with pytest.raises(AttributeError):
        entry.summary = "changed"  # type: ignore[misc]
