"""The one auditable map of gated actions, and pure functions over it (no Flask, no database).

Changing what needs a human countersignature means changing ``POLICY`` below, and nothing else.
A deployment may tighten it (per action, per workspace subtree) with a policy file, but never
loosen it below these entries unless the file says so explicitly: see policy_file.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

AGENT = "agent"
DECISIONS = ("approve", "deny")


@dataclass(frozen=True)
class ActionPolicy:
    """How one destructive action is gated."""

    action: str
    summary: str  # str.format template over the subject's summary fields
    gated_kinds: frozenset[str] = frozenset({AGENT})
    pending_ttl: timedelta = timedelta(hours=24)
    approval_ttl: timedelta = timedelta(minutes=15)
    # Distinct humans who must approve; one denial ends the request whatever this says.
    approvals_required: int = 1
    # Decisions that must carry a reason: a denial always explains itself to the agent.
    reason_required: frozenset[str] = frozenset({"deny"})
    # Pending this long, the request is escalated one level up the workspace tree (None: never).
    escalate_after: timedelta | None = None
    # The human owning the asking agent's token may not approve that agent's request.
    forbid_requester_owner: bool = False

    def gates(self, caller_kind: str) -> bool:
        return caller_kind in self.gated_kinds

    def describe(self, fields: dict[str, Any]) -> str:
        return self.summary.format_map(fields)

    def needs_reason(self, decision: str) -> bool:
        return decision in self.reason_required

    def terms(self) -> dict[str, Any]:
        """The decision terms as plain JSON: stored on each request, hashed into the version."""
        return {
            "gated_kinds": sorted(self.gated_kinds),
            "pending_ttl": int(self.pending_ttl.total_seconds()),
            "approval_ttl": int(self.approval_ttl.total_seconds()),
            "approvals_required": self.approvals_required,
            "reason_required": sorted(self.reason_required),
            "escalate_after": int(self.escalate_after.total_seconds())
            if self.escalate_after is not None
            else None,
            "forbid_requester_owner": self.forbid_requester_owner,
        }

    @classmethod
    def from_terms(cls, action: str, summary: str, terms: dict[str, Any]) -> ActionPolicy:
        """Rebuild the policy a request was created under from its stored terms."""
        escalate = terms.get("escalate_after")
        return cls(
            action,
            summary,
            gated_kinds=frozenset(terms["gated_kinds"]),
            pending_ttl=timedelta(seconds=terms["pending_ttl"]),
            approval_ttl=timedelta(seconds=terms["approval_ttl"]),
            approvals_required=terms["approvals_required"],
            reason_required=frozenset(terms["reason_required"]),
            escalate_after=timedelta(seconds=escalate) if escalate is not None else None,
            forbid_requester_owner=terms["forbid_requester_owner"],
        )


def _policy(*entries: ActionPolicy) -> dict[str, ActionPolicy]:
    return {entry.action: entry for entry in entries}


POLICY: dict[str, ActionPolicy] = _policy(
    ActionPolicy(
        "workspace.delete",
        "Delete workspace {workspace_path}{recursive_note}",
    ),
    ActionPolicy(
        "secret.delete",
        "Delete secret {secret_name!r} in {workspace_path}",
    ),
    ActionPolicy(
        "secret.replace",
        "Overwrite the value of secret {secret_name!r} in {workspace_path}",
    ),
    ActionPolicy(
        "token.mint",
        "Mint a {token_kind} token {token_name!r} scoped to {token_scope}",
    ),
    ActionPolicy(
        "token.revoke",
        "Revoke {token_kind} token {token_name!r} ({token_prefix}…) in {workspace_path}",
    ),
    ActionPolicy(
        "member.remove",
        "Remove {username} ({role}) from {workspace_path}",
    ),
)


class UnknownActionError(KeyError):
    """A route names an action the policy map lacks: refused at startup, never a silent pass."""


def policy_for(action: str) -> ActionPolicy:
    try:
        return POLICY[action]
    except KeyError:
        raise UnknownActionError(f"action {action!r} is not in the policy map") from None


def canonical_json(document: Any) -> str:
    """JSON with keys sorted at every depth and no insignificant whitespace."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(
    action: str, workspace_id: int, target: dict[str, Any], caller_token_id: int
) -> str:
    """Bind an approval to what is done, where, to what, and by whom."""
    document = {
        "action": action,
        "workspace_id": workspace_id,
        "target": target,
        "caller": {"token_id": caller_token_id},
    }
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def keyed_digest(key: str, value: str) -> str:
    """An HMAC of a secret value: binds it into the hash without storing it in clear."""
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def policy_table() -> list[dict[str, str]]:
    """The policy map as rows, for `flask policy show` and the docs."""
    return [
        {
            "action": p.action,
            "gated_kinds": ",".join(sorted(p.gated_kinds)),
            "pending_ttl": format_duration(p.pending_ttl),
            "approval_ttl": format_duration(p.approval_ttl),
            "summary": p.summary,
        }
        for p in POLICY.values()
    ]
