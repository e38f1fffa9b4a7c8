"""The optional policy file: tune the built-in POLICY per action and per workspace subtree.

Pure (no Flask, no database): plain values in, an ActionPolicy out, so the resolver is unit-tested
on its own and the gate only hands it the workspace chain. The built-in map stays the floor: a
file may tighten it, and loosens it only when it says ``allow_loosening = true``.

    allow_loosening = false            # the default: anything weaker than POLICY is refused

    [actions."secret.delete"]          # one action, everywhere
    approvals_required = 2             # distinct humans
    reason_required = ["approve", "deny"]
    forbid_requester_owner = true      # the agent token's owner may not approve its request

    [[rules]]                          # a subtree, by root-first path of names or by id
    workspace = "acme/prod"            # or: workspace = 3
    actions = ["workspace.delete"]     # optional; every action when absent
    escalate_after = "30min"
    pending_ttl = "4h"
    approval_ttl = "5min"
    gated_kinds = ["agent", "service"]

Precedence, lowest first: the built-in entry, ``[actions.*]``, rules without a workspace, then
workspace rules from the root down (file order among equals), so the nearest subtree wins.
Durations are whole seconds, or a string such as "90s", "15min" (or "15m"), "2h", "1d".
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from .policy import DECISIONS, POLICY, ActionPolicy, canonical_json, format_duration, policy_for

CALLER_KINDS = frozenset({"agent", "user", "service"})
SETTINGS = (
    "gated_kinds",
    "approvals_required",
    "reason_required",
    "pending_ttl",
    "approval_ttl",
    "escalate_after",
    "forbid_requester_owner",
)
MAX_APPROVALS = 10
MAX_DURATION = timedelta(days=30)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+)\s*(s|sec|m|min|h|d)")

# A chain as the resolver sees it: (workspace id, name), nearest first (the gate's order).
Chain = Sequence[tuple[int, str]]


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Rule:
    """One block of settings from the file, and where it applies."""

    source: str  # 'actions."secret.delete"' or 'rules[2]', for messages and `policy show`
    order: int
    settings: dict[str, Any]
    actions: frozenset[str] | None = None  # None: every action
    workspace: int | tuple[str, ...] | None = None  # an id, or a root-first path of names
    action_table: bool = False

    def depth(self, root_first: Chain) -> int | None:
        """Where the rule sits in precedence for this chain, or None when it does not apply."""
        if self.action_table:
            return -2
        if self.workspace is None:
            return -1
        if isinstance(self.workspace, int):
            ids = [ws_id for ws_id, _ in root_first]
            return ids.index(self.workspace) if self.workspace in ids else None
        names = tuple(name for _, name in root_first[: len(self.workspace)])
        return len(self.workspace) - 1 if names == self.workspace else None

    def describe(self) -> str:
        where = (
            "everywhere"
            if self.workspace is None
            else f"workspace #{self.workspace}"
            if isinstance(self.workspace, int)
            else "workspace " + " / ".join(self.workspace)
        )
        which = "every action" if self.actions is None else ", ".join(sorted(self.actions))
        values = ", ".join(f"{k}={_show(v)}" for k, v in sorted(self.settings.items()))
        return f"{self.source}: {where}, {which}: {values}"

    def document(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "actions": sorted(self.actions) if self.actions is not None else None,
            "workspace": list(self.workspace)
            if isinstance(self.workspace, tuple)
            else self.workspace,
            "settings": {k: _plain(v) for k, v in sorted(self.settings.items())},
        }


@dataclass(frozen=True)
class EffectivePolicy:
    """The built-in map plus the file's rules; ``resolve`` gives the policy for one request."""

    rules: tuple[Rule, ...] = ()
    source: str = "built-in"
    allow_loosening: bool = False
    version: str = field(default="")

    def resolve(self, action: str, chain: Chain = ()) -> ActionPolicy:
        """The policy for ``action`` in the workspace whose nearest-first chain is given."""
        base = policy_for(action)  # read at call time: the built-in map is the one source
        if not self.rules:
            return base
        root_first = list(reversed(chain))
        matched = []
        for rule in self.rules:
            if rule.actions is not None and action not in rule.actions:
                continue
            depth = rule.depth(root_first)
            if depth is not None:
                matched.append((depth, rule.order, rule))
        merged: dict[str, Any] = {}
        for _, _, rule in sorted(matched, key=lambda item: item[:2]):
            merged.update(rule.settings)
        return replace(base, **merged) if merged else base

    def table(self) -> list[dict[str, str]]:
        """Each action as resolved outside any workspace rule, for `flask policy show`."""
        rows = []
        for action in POLICY:
            p = self.resolve(action)
            rows.append(
                {
                    "action": action,
                    "gated_kinds": ",".join(sorted(p.gated_kinds)),
                    "approvals": str(p.approvals_required),
                    "reason_for": ",".join(sorted(p.reason_required)) or "-",
                    "pending_ttl": format_duration(p.pending_ttl),
                    "approval_ttl": format_duration(p.approval_ttl),
                    "escalate_after": format_duration(p.escalate_after)
                    if p.escalate_after
                    else "never",
                    "forbid_owner": "yes" if p.forbid_requester_owner else "no",
                }
            )
        return rows

    def subtree_rules(self) -> list[str]:
        return [rule.describe() for rule in self.rules if rule.workspace is not None]


def builtin_policy() -> EffectivePolicy:
    return EffectivePolicy(version=_version(False, ()))


def load_policy(path: str | Path | None) -> EffectivePolicy:
    """The effective policy: the built-in map, tuned by the file at ``path`` when given."""
    if not path:
        return builtin_policy()
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise PolicyError(f"policy file {path}: cannot read it ({error.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise PolicyError(f"policy file {path}: not valid TOML ({error})") from None
    return parse_policy(data, source=str(path))


def parse_policy(data: dict[str, Any], source: str = "policy") -> EffectivePolicy:
    """Validate a parsed policy document against the built-in map; PolicyError on any fault."""

    def fail(message: str) -> PolicyError:
        return PolicyError(f"policy file {source}: {message}")

    unknown = set(data) - {"allow_loosening", "actions", "rules"}
    if unknown:
        raise fail(f"unknown key {sorted(unknown)[0]!r} (expected allow_loosening, actions, rules)")
    allow_loosening = data.get("allow_loosening", False)
    if not isinstance(allow_loosening, bool):
        raise fail("allow_loosening must be true or false")

    rules: list[Rule] = []
    actions = data.get("actions", {})
    if not isinstance(actions, dict):
        raise fail('actions must be a table, e.g. [actions."secret.delete"]')
    for action, table in actions.items():
        where = f"actions.{_quote(action)}"
        if action not in POLICY:
            raise fail(f"{where}: unknown action {action!r} (known: {', '.join(POLICY)})")
        if not isinstance(table, dict):
            raise fail(f"{where} must be a table")
        settings = _settings(table, where, frozenset({action}), allow_loosening, fail)
        rules.append(Rule(where, len(rules), settings, frozenset({action}), action_table=True))

    entries = data.get("rules", [])
    if not isinstance(entries, list):
        raise fail("rules must be an array of tables: [[rules]]")
    for index, entry in enumerate(entries, start=1):
        where = f"rules[{index}]"
        if not isinstance(entry, dict):
            raise fail(f"{where} must be a table")
        body = dict(entry)
        workspace = _workspace(body.pop("workspace", None), where, fail)
        applies = _actions(body.pop("actions", None), where, fail)
        settings = _settings(body, where, applies, allow_loosening, fail)
        rules.append(Rule(where, len(rules), settings, applies, workspace))

    return EffectivePolicy(
        rules=tuple(rules),
        source=source,
        allow_loosening=allow_loosening,
        version=_version(allow_loosening, rules),
    )


def parse_duration(value: Any, where: str = "duration") -> timedelta:
    """Whole seconds, or "<n>s" / "<n>min" / "<n>m" / "<n>h" / "<n>d"; 1s to 30 days."""
    seconds = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = int(match[1]) * _UNITS[match[2]]
    if seconds is None:
        raise PolicyError(
            f'{where}: {value!r} is not a duration; use seconds or e.g. "90s", "15min", "2h", "1d"'
        )
    delta = timedelta(seconds=seconds)
    if not timedelta(seconds=1) <= delta <= MAX_DURATION:
        raise PolicyError(f"{where}: {value!r} is outside 1s to 30 days")
    return delta


# ---- validation ------------------------------------------------------------------------------


def _settings(table, where, applies, allow_loosening, fail) -> dict[str, Any]:
    unknown = set(table) - set(SETTINGS)
    if unknown:
        raise fail(
            f"{where}: unknown setting {sorted(unknown)[0]!r} (known: {', '.join(SETTINGS)})"
        )
    if not table:
        raise fail(f"{where}: sets nothing")
    settings: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{where}.{key}"
        try:
            settings[key] = _convert(key, value, at)
        except PolicyError as error:
            raise fail(str(error)) from None
    if not allow_loosening:
        for action in sorted(applies if applies is not None else POLICY):
            problem = _loosening(POLICY[action], settings)
            if problem:
                raise fail(
                    f"{where}: {problem} for {action}; the built-in policy is the floor "
                    "(set allow_loosening = true to permit this)"
                )
    return settings


def _convert(key: str, value: Any, at: str) -> Any:
    if key == "gated_kinds":
        kinds = _string_list(value, at)
        if not kinds <= CALLER_KINDS:
            raise PolicyError(f"{at}: unknown caller kind {sorted(kinds - CALLER_KINDS)[0]!r}")
        return kinds
    if key == "reason_required":
        decisions = _string_list(value, at)
        if not decisions <= set(DECISIONS):
            raise PolicyError(f"{at}: decisions are 'approve' and 'deny'")
        return decisions
    if key == "approvals_required":
        if not isinstance(value, int) or isinstance(value, bool):
            raise PolicyError(f"{at}: must be a whole number")
        if not 1 <= value <= MAX_APPROVALS:
            raise PolicyError(f"{at}: must be from 1 to {MAX_APPROVALS}")
        return value
    if key == "forbid_requester_owner":
        if not isinstance(value, bool):
            raise PolicyError(f"{at}: must be true or false")
        return value
    return parse_duration(value, at)  # pending_ttl, approval_ttl, escalate_after


def _loosening(floor: ActionPolicy, settings: dict[str, Any]) -> str | None:
    """What in ``settings`` is weaker than the built-in entry, if anything."""
    if "gated_kinds" in settings and not floor.gated_kinds <= settings["gated_kinds"]:
        missing = sorted(floor.gated_kinds - settings["gated_kinds"])
        return f"gated_kinds drops {', '.join(missing)}"
    if settings.get("approvals_required", floor.approvals_required) < floor.approvals_required:
        return f"approvals_required is below the built-in {floor.approvals_required}"
    if "reason_required" in settings and not floor.reason_required <= settings["reason_required"]:
        return f"reason_required drops {', '.join(sorted(floor.reason_required))}"
    if settings.get("approval_ttl", floor.approval_ttl) > floor.approval_ttl:
        return (
            f"approval_ttl {format_duration(settings['approval_ttl'])} is longer than the "
            f"built-in {format_duration(floor.approval_ttl)}"
        )
    if floor.forbid_requester_owner and settings.get("forbid_requester_owner") is False:
        return "forbid_requester_owner is switched off"
    return None


def _string_list(value: Any, at: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{at}: must be a list of strings")
    return frozenset(value)


def _workspace(value: Any, where: str, fail) -> int | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        parts = tuple(part.strip() for part in value.split("/"))
        if all(parts):
            return parts
    raise fail(f'{where}.workspace: give an id (3) or a root-first path ("acme/prod")')


def _actions(value: Any, where: str, fail) -> frozenset[str] | None:
    if value is None:
        return None
    try:
        names = _string_list(value, f"{where}.actions")
    except PolicyError as error:
        raise fail(str(error)) from None
    unknown = sorted(names - set(POLICY))
    if unknown or not names:
        raise fail(f"{where}.actions: unknown action {unknown[0] if unknown else '(none given)'!r}")
    return names


# ---- presentation and versioning -------------------------------------------------------------


def _version(allow_loosening: bool, rules: Sequence[Rule]) -> str:
    """A short hash of the effective policy: the built-in map and the file's rules."""
    document = {
        "builtin": {
            action: {"summary": entry.summary, **entry.terms()} for action, entry in POLICY.items()
        },
        "allow_loosening": allow_loosening,
        "rules": [rule.document() for rule in rules],
    }
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _quote(name: str) -> str:
    return f'"{name}"' if "." in name else name
