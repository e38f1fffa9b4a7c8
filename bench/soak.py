"""Soak: bounded mixed traffic for a while, then invariants checked over the whole database.

Traffic (over HTTP, to gunicorn on loopback, capped at ``--rate`` requests per second):
- agents DELETE secrets (each secret belongs to one agent and is created once, never again),
  retry them, withdraw some pending requests, and long-poll a few;
- humans list pending requests and approve (most) or deny (some, with a reason);
- optionally, dashboards hold live websockets open and count the frames they receive.

Invariants, checked at the end against the database:
1. every 204 an agent got is a secret gone, and every secret gone got a 204 (observable ops);
2. every consumed ``secret.delete`` approval matches exactly one deleted secret, and every
   deleted secret has exactly one consumed approval (nothing ran without one);
3. no request is in two states: replaying each request's events through the state machine
   (pending → approved → consumed | expired; pending → denied | withdrawn | expired) never
   takes a forbidden step and ends in the stored status; at most one pending row per key;
4. zero 5xx answers, and no answer outside the expected ones;
5. the audit hash chain verifies (``flask --app wsgi audit verify``), when the command exists.

Prints a summary and exits non-zero on any violation.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench import harness
from bench.harness import Http, Server, World, log, secret_path

# Event kinds that move a request between states; other kinds (votes, escalations, ...) must
# leave the state as it was.
TRANSITIONS = {
    ("pending", "approved"): "approved",
    ("pending", "denied"): "denied",
    ("pending", "withdrawn"): "withdrawn",
    ("pending", "expired"): "expired",
    ("approved", "consumed"): "consumed",
    ("approved", "expired"): "expired",
}
STATE_KINDS = {"created", *(kind for _, kind in TRANSITIONS)}
EXPECTED = {
    "agent_delete": {202, 204, 403},
    "agent_withdraw": {200, 409},
    "agent_poll": {200},
    "human_list": {200},
    "human_decide": {200, 409},
}


class RateLimit:
    """A shared token bucket: at most ``rate`` operations per second across all threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def wait(self, stop: threading.Event) -> bool:
        with self.lock:
            now = time.monotonic()
            at = max(self.next_at, now)
            self.next_at = at + self.interval
        delay = at - time.monotonic()
        return not stop.wait(delay) if delay > 0 else not stop.is_set()


@dataclass
class Tally:
    """What the clients saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)  # (op, status) -> count
    unexpected: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    deleted: set[tuple[int, str]] = field(default_factory=set)  # (workspace, name) with a 204
    approval_of: dict[int, tuple[int, str]] = field(default_factory=dict)  # id -> secret
    frames: Counter = field(default_factory=Counter)

    def saw(self, op: str, status: int, detail: str = "") -> None:
        with self.lock:
            self.statuses[(op, status)] += 1
            if status not in EXPECTED[op]:
                self.unexpected.append(f"{op} -> {status} {detail}"[:300])


class Agent:
    """One agent token and the secrets it alone works on."""

    def __init__(self, name: str, token: str, secrets: list[tuple[int, str]]) -> None:
        self.name, self.token = name, token
        self.fresh = list(secrets)  # never requested (or withdrawn: may be asked again)
        self.waiting: dict[tuple[int, str], int] = {}  # secret -> approval id (pending or approved)
        self.random = random.Random(name)

    def step(self, http: Http, tally: Tally) -> None:
        roll = self.random.random()
        if self.waiting and roll < 0.08:
            secret, approval_id = self.random.choice(list(self.waiting.items()))
            status, body = http.json("POST", f"/api/approvals/{approval_id}/withdraw", self.token)
            tally.saw("agent_withdraw", status, str(body))
            if status == 200:
                del self.waiting[secret]
                self.fresh.append(secret)  # asking again makes a new request
            return
        if self.waiting and roll < 0.12:
            approval_id = self.random.choice(list(self.waiting.values()))
            status, body = http.json("GET", f"/api/approvals/{approval_id}?wait=0.5", self.token)
            tally.saw("agent_poll", status, str(body))
            return
        if self.waiting and (roll < 0.75 or not self.fresh):
            secret = self.random.choice(list(self.waiting))
        elif self.fresh:
            secret = self.fresh.pop(self.random.randrange(len(self.fresh)))
        else:
            return
        status, body = http.json("DELETE", secret_path(*secret), self.token)
        tally.saw("agent_delete", status, str(body))
        if status == 202:
            self.waiting[secret] = body["approval_id"]
            with tally.lock:
                tally.approval_of[body["approval_id"]] = secret
        elif status == 204:
            self.waiting.pop(secret, None)
            with tally.lock:
                tally.deleted.add(secret)
        elif status == 403:
            self.waiting.pop(secret, None)  # denied: the answer stands, stop asking
        elif secret not in self.waiting:
            self.fresh.append(secret)


class Human:
    def __init__(self, name: str, token: str) -> None:
        self.name, self.token = name, token
        self.random = random.Random(name)

    def step(self, http: Http, tally: Tally) -> None:
        # Humans take a moment (not counted against the rate), so requests stay pending for a
        # while and agents get to retry and withdraw them.
        time.sleep(self.random.uniform(0.1, 0.6))
        status, body = http.json("GET", "/api/approvals?status=pending&limit=25", self.token)
        tally.saw("human_list", status, str(body))
        if status != 200 or not body["approvals"]:
            return
        approval = self.random.choice(body["approvals"])
        approve = self.random.random() < 0.8
        status, body = http.json(
            "POST",
            f"/api/approvals/{approval['id']}/decision",
            self.token,
            {"decision": "approve" if approve else "deny", "reason": f"soak by {self.name}"},
        )
        tally.saw("human_decide", status, str(body))


def dashboard(base_url: str, world: World, user: str, stop: threading.Event, tally: Tally):
    """A logged-in dashboard holding its live websocket open, counting frames."""
    import requests
    from simple_websocket import Client

    http = requests.Session()
    page = http.get(f"{base_url}/login", timeout=10)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if page.status_code != 200 or not match:
        with tally.lock:
            tally.frames["no_dashboard"] += 1
        return
    http.post(
        f"{base_url}/login",
        data={"username": user, "password": world.password, "csrf_token": match.group(1)},
        allow_redirects=False,
        timeout=10,
    )
    cookie = "; ".join(f"{c.name}={c.value}" for c in http.cookies)
    url = base_url.replace("http://", "ws://", 1) + "/ws?view=pending"

    class HostWithPort(Client):
        """Send Host with its port, as browsers do (the origin check compares them)."""

        def handshake(self) -> None:
            if self.port not in (80, 443):
                self.host = f"{self.host}:{self.port}"
            super().handshake()

    try:
        ws = HostWithPort(url, headers={"Cookie": cookie, "Origin": base_url})
    except Exception as error:  # a refused socket is a finding, not a crash of the soak
        with tally.lock:
            tally.frames["refused"] += 1
            tally.transport_errors.append(f"dashboard {user}: {error!r}"[:300])
        return
    try:
        while not stop.is_set():
            try:
                message = ws.receive(timeout=1)
            except Exception:  # closed by the server
                with tally.lock:
                    tally.frames["closed_by_server"] += 1
                return
            if message is not None:
                with tally.lock:
                    tally.frames["frames"] += 1
    finally:
        ws.close()


def traffic(
    server: Server, world: World, agents: list[Agent], humans: list[Human], args
) -> tuple[Tally, float]:
    tally = Tally()
    stop = threading.Event()
    limit = RateLimit(args.rate)

    def loop(actor) -> None:
        http = Http(server.base_url)
        while limit.wait(stop):
            try:
                actor.step(http, tally)
            except OSError as error:
                with tally.lock:
                    tally.transport_errors.append(f"{actor.name}: {error!r}"[:300])
                http.close()
        http.close()

    dashboards = [
        threading.Thread(
            target=dashboard,
            args=(server.base_url, world, ("alice", "dave", "erin")[i % 3], stop, tally),
        )
        for i in range(args.dashboards)
    ]
    for thread in dashboards:
        thread.start()
    threads = [threading.Thread(target=loop, args=(actor,)) for actor in (*agents, *humans)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    deadline = began + args.seconds
    while time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        done = sum(tally.statuses.values())
        log(f"soak: {time.monotonic() - began:5.0f}s {done} requests, {len(tally.deleted)} deleted")
    stop.set()
    for thread in (*threads, *dashboards):
        thread.join(timeout=30)
    return tally, time.monotonic() - began


# ---- the invariants ----------------------------------------------------------------------------


def check(url: str, seeded: set[tuple[int, str]], tally: Tally) -> dict[str, Any]:
    violations: dict[str, list] = defaultdict(list)
    with harness.connect(url) as conn:
        remaining = {
            (ws, name)
            for ws, name in conn.execute(
                "SELECT workspace_id, name FROM secrets WHERE name LIKE 'soak-%'"
            ).fetchall()
        }
        requests = {
            row[0]: row
            for row in conn.execute(
                "SELECT id, status, action, workspace_id, consumed_at, decided_at, context"
                " FROM approval_requests"
            ).fetchall()
        }
        events: dict[int, list[str]] = defaultdict(list)
        for approval_id, kind in conn.execute(
            "SELECT approval_id, kind FROM approval_events ORDER BY id"
        ).fetchall():
            events[approval_id].append(kind)
        duplicate_pending = conn.execute(
            "SELECT workspace_id, action, request_hash, count(*) FROM approval_requests"
            " WHERE status = 'pending' GROUP BY 1, 2, 3 HAVING count(*) > 1"
        ).fetchall()

    # 1. observable operations
    gone = seeded - remaining
    for secret in sorted(gone - tally.deleted):
        violations["deleted_without_a_204"].append(secret)
    for secret in sorted(tally.deleted - gone):
        violations["204_but_secret_still_there"].append(secret)

    # 2. consumed approvals <-> deleted secrets
    consumed_per_secret: Counter = Counter()
    unknown_ids = []
    for approval_id, (_, status, action, workspace_id, *_rest) in requests.items():
        secret = tally.approval_of.get(approval_id) or _secret_from_context(
            workspace_id, requests[approval_id][6]
        )
        if secret is None:
            unknown_ids.append(approval_id)
            continue
        if status == "consumed" and action == "secret.delete":
            consumed_per_secret[secret] += 1
    for secret in sorted(gone):
        if consumed_per_secret[secret] != 1:
            violations["deleted_secret_without_exactly_one_consumed_approval"].append(
                (secret, consumed_per_secret[secret])
            )
    for secret in sorted(set(consumed_per_secret) - gone):
        violations["consumed_approval_but_secret_still_there"].append(secret)

    # 3. one state at a time
    for approval_id, (_, status, _, _, consumed_at, decided_at, _) in requests.items():
        kinds = events.get(approval_id, [])
        if kinds.count("created") != 1:
            violations["not_exactly_one_created_event"].append((approval_id, kinds))
            continue
        state = "pending"
        for kind in kinds[kinds.index("created") + 1 :]:
            if kind not in STATE_KINDS:
                continue  # votes, escalations, ...: no state change
            nxt = TRANSITIONS.get((state, kind))
            if nxt is None:
                violations["forbidden_transition"].append((approval_id, state, kind, kinds))
                break
            state = nxt
        if state != status:
            violations["events_disagree_with_status"].append((approval_id, status, kinds))
        if (status == "consumed") != (consumed_at is not None):
            violations["consumed_at_mismatch"].append((approval_id, status))
        if status in ("approved", "denied", "consumed") and decided_at is None:
            violations["decided_without_decided_at"].append((approval_id, status))
    for row in duplicate_pending:
        violations["two_pending_rows_for_one_key"].append(row)

    # 4. answers
    fives = {f"{op} {status}": n for (op, status), n in tally.statuses.items() if status >= 500}
    if fives:
        violations["5xx_answers"].append(fives)
    if tally.unexpected:
        violations["unexpected_answers"].extend(tally.unexpected[:20])
    if unknown_ids and not tally.transport_errors:
        violations["approvals_no_client_was_told_about"].extend(unknown_ids[:20])

    # 5. the audit chain
    audit = audit_verify(url)
    if audit.get("ok") is False:
        violations["audit_chain"].append(audit.get("output"))

    other_kinds = sorted({k for kinds in events.values() for k in kinds} - STATE_KINDS)
    return {
        "secrets_seeded": len(seeded),
        "secrets_deleted": len(gone),
        "agent_204s": len(tally.deleted),
        "approval_requests": len(requests),
        "by_status": dict(Counter(row[1] for row in requests.values())),
        "events": sum(len(k) for k in events.values()),
        "other_event_kinds": other_kinds,
        "audit": audit,
        "violations": {k: v[:20] for k, v in violations.items()},
        "violation_count": sum(len(v) for v in violations.values()),
    }


def _secret_from_context(workspace_id: int, context: Any) -> tuple[int, str] | None:
    try:
        name = (context if isinstance(context, dict) else json.loads(context))["target"]["secret"]
    except (KeyError, TypeError, ValueError):
        return None
    return (workspace_id, name)


def audit_verify(url: str) -> dict[str, Any]:
    """Run ``flask --app wsgi audit verify`` if this version of the app has it."""
    env = {"DATABASE_URL": url, "SECRET_KEY": harness.SECRET_KEY}
    flask = [str(harness.venv_bin("flask")), "--app", "wsgi", "audit"]
    probe = subprocess.run(
        [*flask, "--help"], cwd=harness.ROOT, env=_env(env), capture_output=True, text=True
    )
    if probe.returncode != 0 or "verify" not in probe.stdout:
        return {"skipped": "no `flask audit verify` command in this version"}
    done = subprocess.run(
        [*flask, "verify"], cwd=harness.ROOT, env=_env(env), capture_output=True, text=True
    )
    output = (done.stdout + done.stderr).strip()[-1000:]
    return {"ok": done.returncode == 0, "output": output}


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


# ---- running -----------------------------------------------------------------------------------


def run(url: str, args) -> dict[str, Any]:
    preflight = None
    if args.preflight:
        from bench import preflight as check_config

        preflight = check_config.run(url)
    harness.empty_database(url)
    world = harness.seed(url, leaves=4, agents=args.agents, humans=("dave", "erin"))
    per_agent = max(50, int(args.rate * args.seconds / max(1, args.agents)))
    agents = []
    seeded: set[tuple[int, str]] = set()
    for a in range(args.agents):
        secrets = [(world.leaves[i % len(world.leaves)], f"soak-{a}-{i}") for i in range(per_agent)]
        seeded.update(secrets)
        agents.append(Agent(f"agent-{a}", world.tokens[f"agent-{a}"], secrets))
    harness.add_secrets(url, sorted(seeded))
    humans = [Human(name, world.tokens[name]) for name in ("alice", "dave", "erin")[: args.humans]]
    log(
        f"soak: {args.seconds:.0f}s at <= {args.rate} req/s, {args.agents} agents, "
        f"{len(humans)} humans, {args.dashboards} dashboards"
    )
    with Server(url) as server:
        tally, elapsed = traffic(server, world, agents, humans, args)
        server_line = server.describe()
    log("soak: checking invariants")
    invariants = check(url, seeded, tally)
    total = sum(tally.statuses.values())
    return {
        "seconds": round(elapsed, 1),
        "server": server_line,
        "rate_cap": args.rate,
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "answers": {f"{op} {status}": n for (op, status), n in sorted(tally.statuses.items())},
        "transport_errors": tally.transport_errors[:10],
        "dashboards": {"connected": args.dashboards, **dict(tally.frames)},
        "preflight": preflight,
        **invariants,
        "ok": invariants["violation_count"] == 0 and not tally.transport_errors,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument(
        "--rate",
        type=float,
        default=60,
        help="operations per second, at most (a human's list + decision is one operation)",
    )
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--humans", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--dashboards", type=int, default=6)
    parser.add_argument(
        "--no-preflight",
        dest="preflight",
        action="store_false",
        help="skip bench/preflight.py (its workaround for a known issue, when needed)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary here")
    return parser


def main() -> None:
    args = parser().parse_args()
    result = run(harness.database_url(), args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)
    verdict = "OK" if result["ok"] else f"FAILED ({result['violation_count']} violation(s))"
    print(
        f"soak {verdict}: {result['requests']} requests in {result['seconds']}s, "
        f"{result['secrets_deleted']} secrets deleted = {result['agent_204s']} agent 204s, "
        f"statuses {result['by_status']}",
        file=sys.stderr,
    )
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
