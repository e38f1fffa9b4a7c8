"""Scale: gate latency with 1k vs 1M historical approval requests.

Two databases on the same PostgreSQL server, identical but for the history bulk-loaded into
``approval_requests`` (INSERT ... SELECT generate_series: mostly consumed, expired and denied,
spread over 5,000 workspaces, 6 actions, a year of timestamps, unique hashes; a few live
pending and lapsed approved rows). Two gunicorn servers, one per database, measured in
alternating rounds so both see the same machine noise. The ratio 1M / 1k should stay near 1.0:
the gate's lookups go through partial indexes that only hold live (pending / approved) rows.

At 1M rows the consume and dedup statements, captured from a real gate request in-process,
are run again under ``EXPLAIN (ANALYZE, BUFFERS)`` in a rolled-back transaction.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from typing import Any

from bench import harness
from bench.harness import (
    Http,
    Server,
    World,
    approve,
    latency_summary,
    log,
    median,
    request_approval,
    secret_path,
    timed_run,
)

ACTIONS = (
    "ARRAY['workspace.delete','secret.delete','secret.replace',"
    "'token.mint','token.revoke','member.remove']"
)
# Per mille of history rows in each status; the rest are consumed.
STATUS_CASE = """CASE
    WHEN g % 1000 < 200 THEN 'expired'
    WHEN g % 1000 < 350 THEN 'denied'
    WHEN g % 1000 < 420 THEN 'withdrawn'
    WHEN g % 1000 < 422 THEN 'approved'
    WHEN g % 1000 < 423 THEN 'pending'
    ELSE 'consumed' END"""
# What each column gets; columns the table lacks are skipped, NOT NULL columns missing here fail.
HISTORY_COLUMNS = {
    "workspace_id": "1000 + (g::bigint * 7919) % 5000",
    "action": f"({ACTIONS})[1 + g % 6]",
    "request_hash": "md5(g::text) || md5((g + 1)::text)",
    "summary": "'historical request ' || g",
    "context": """'{"history": true}'""",
    "workspace_path": "'[]'",
    "requested_by_token_id": "NULL",
    "requested_by_kind": "'agent'",
    "requested_by_name": "'history-agent-' || (g % 20)",
    "status": "st",
    "created_at": "created",
    # live pending rows expire in the future; everything else long ago
    "expires_at": "CASE WHEN st = 'pending' THEN now() + interval '20 hours'"
    " ELSE created + interval '24 hours' END",
    "decided_at": "CASE WHEN st IN ('approved','denied','consumed')"
    " THEN created + interval '10 minutes' END",
    "decided_by_name": "CASE WHEN st IN ('approved','denied','consumed') THEN 'history-human' END",
    "decided_level": "CASE WHEN st IN ('approved','denied','consumed') THEN 0 END",
    "reason": "CASE WHEN st = 'denied' THEN 'not now' END",
    "approval_expires_at": "CASE WHEN st IN ('approved','consumed')"
    " THEN created + interval '25 minutes' END",
    "consumed_at": "CASE WHEN st = 'consumed' THEN created + interval '12 minutes' END",
    "approvals_required": "1",
    "escalation_level": "0",
}


def load_history(url: str, rows: int) -> float:
    """Bulk-load ``rows`` historical approval requests; returns seconds taken."""
    with harness.connect(url) as conn:
        columns = conn.execute(
            "SELECT column_name, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_name = 'approval_requests' AND table_schema = current_schema()"
        ).fetchall()
        names = [name for name, _, _ in columns if name in HISTORY_COLUMNS]
        missing = [
            name
            for name, nullable, default in columns
            if nullable == "NO" and default is None and name not in HISTORY_COLUMNS
        ]
        if missing:
            raise RuntimeError(f"bench/scale.py does not know how to fill {missing}")
        started = time.perf_counter()
        conn.execute(
            f"INSERT INTO approval_requests ({', '.join(names)}) "
            f"SELECT {', '.join(HISTORY_COLUMNS[n] for n in names)} FROM ("
            f"  SELECT g, {STATUS_CASE} AS st,"
            "   now() - interval '1 day' - (g % 525600) * interval '1 minute' AS created"
            f"  FROM generate_series(1, {rows}) AS g) AS history"
        )
        conn.execute("VACUUM ANALYZE approval_requests")
        return time.perf_counter() - started


def prepare_target(url: str, history: int) -> tuple[World, float]:
    harness.empty_database(url)
    world = harness.seed(url, leaves=1, agents=1)
    seconds = load_history(url, history)
    return world, seconds


class Target:
    """One database + its server + the seeded world."""

    def __init__(self, label: str, url: str, world: World) -> None:
        self.label, self.url, self.world = label, url, world
        self.leaf = world.leaves[0]
        self.server = Server(url, log_path=None)
        self.counter = 0

    def fresh(self, count: int) -> list[str]:
        names = [f"scale-{self.counter + i}" for i in range(count)]
        self.counter += count
        harness.add_secrets(self.url, [(self.leaf, name) for name in names])
        return names

    def pending(self, count: int) -> list[str]:
        names = self.fresh(count)
        harness.parallel(
            names,
            lambda h, n: request_approval(h, self.world, self.leaf, n),
            self.server.base_url,
        )
        return names

    def approved(self, count: int) -> list[str]:
        names = self.fresh(count)
        ids = harness.parallel(
            names,
            lambda h, n: request_approval(h, self.world, self.leaf, n),
            self.server.base_url,
        )
        harness.parallel(ids, lambda h, i: approve(h, self.world, i), self.server.base_url)
        return names

    def send(self, http: Http, name: str) -> int:
        return http.request("DELETE", secret_path(self.leaf, name), self.world.tokens["agent"])[0]


SCENARIOS: dict[str, tuple[str, int, Callable[[Target, int], list[str]]]] = {
    "first_202": ("agent's first request: dedup INSERT creates the pending row", 202, Target.fresh),
    "retry_202": (
        "agent retry while pending: consume misses, pending found",
        202,
        lambda t, n: [p for p in t.pending(32) for _ in range(n // 32 + 1)][:n],
    ),
    "consume_204": ("agent retry after approval: consume + delete", 204, Target.approved),
}


def measure(targets: list[Target], rounds: int, per_round: int, concurrency: int) -> dict:
    samples: dict[str, dict[str, list[harness.Timed]]] = {
        name: {t.label: [] for t in targets} for name in SCENARIOS
    }
    for target in targets:  # warm both servers alike
        for _, _, prepare in SCENARIOS.values():
            timed_run(target.server.base_url, prepare(target, 40), target.send, concurrency)
    for r in range(rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        for name, (_, _, prepare) in SCENARIOS.items():
            for target in order:
                items = prepare(target, per_round)
                samples[name][target.label].append(
                    timed_run(target.server.base_url, items, target.send, concurrency)
                )
        log(f"scale: round {r + 1}/{rounds}")
    results: dict[str, Any] = {}
    small, large = targets[0].label, targets[-1].label
    for name, (description, expected, _) in SCENARIOS.items():
        entry: dict[str, Any] = {"description": description, "expected_status": expected}
        for target in targets:
            runs = samples[name][target.label]
            statuses: dict[str, int] = {}
            for run in runs:
                for status, count in run.statuses.items():
                    statuses[str(status)] = statuses.get(str(status), 0) + count
            entry[target.label] = {
                "req_per_s": round(median([run.rate for run in runs]), 1),
                **latency_summary([x for run in runs for x in run.latencies]),
                "statuses": statuses,
            }
        pairs = list(zip(samples[name][small], samples[name][large], strict=True))
        entry["p50_ratio_1m_to_1k"] = round(
            median(
                [
                    harness.percentile(sorted(b.latencies), 50)
                    / harness.percentile(sorted(a.latencies), 50)
                    for a, b in pairs
                ]
            ),
            3,
        )
        entry["rate_ratio_1m_to_1k"] = round(median([b.rate / a.rate for a, b in pairs]), 3)
        results[name] = entry
    return results


# ---- EXPLAIN at 1M -----------------------------------------------------------------------------


def explain(url: str, world: World) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the gate's statements, captured from real requests.

    The agent's first request is recorded; its lookups and its dedup INSERT are explained while
    the pending row exists (the conflict path a retry takes); then a human approves and the
    consume UPDATE is explained with the approved row present (the hit). Each EXPLAIN runs in a
    transaction rolled back at once, since ANALYZE really executes the statement.
    """
    from app.extensions import db
    from bench.statements import recording

    leaf = world.leaves[0]
    harness.add_secrets(url, [(leaf, "explain-me")])
    agent, alice = world.tokens["agent"], world.tokens["alice"]
    plans: dict[str, Any] = {}
    with harness.local_app(url) as app, recording(db.engine) as recorder:
        client = app.test_client()
        recorder.active = True
        first = client.delete(
            secret_path(leaf, "explain-me"), headers={"Authorization": f"Bearer {agent}"}
        )
        recorder.active = False
        captured = list(recorder.statements)
        _explain_into(
            plans,
            url,
            captured,
            {
                "dedup_insert (pending row present: ON CONFLICT DO NOTHING)": (
                    r"^INSERT INTO approval_requests"
                ),
                # One statement: the consuming UPDATE (a miss here) in a CTE beside the
                # pending lookup.
                "consume_or_find_pending (no approved row: the miss)": r"^WITH consumed AS",
                "find_recent_denial": r"decided_at >",
            },
        )
        client.post(
            f"/api/approvals/{first.get_json()['approval_id']}/decision",
            headers={"Authorization": f"Bearer {alice}"},
            json={"decision": "approve", "reason": "explain"},
        )
        _explain_into(
            plans,
            url,
            captured,
            {
                "consume_or_find_pending (approved row present: the hit)": (r"^WITH consumed AS"),
            },
        )
    return plans


def _explain_into(plans: dict, url: str, captured: list, wanted: dict[str, str]) -> None:
    with harness.connect(url, autocommit=False) as conn:
        for label, pattern in wanted.items():
            statement = next((s for s in captured if re.search(pattern, s.sql)), None)
            if statement is None:
                plans[label] = {"skipped": "statement not issued by this version of the gate"}
                continue
            rows = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement.sql, statement.parameters
            ).fetchall()
            conn.rollback()  # EXPLAIN ANALYZE really runs the UPDATE / INSERT
            lines = [row[0] for row in rows]
            text = " ".join(lines)
            plans[label] = {
                "sql": statement.sql,
                "plan": lines,
                "indexes_used": sorted(
                    set(re.findall(r"using (\w+)", text))
                    | set(re.findall(r"Arbiter Indexes: (\w+)", text))
                ),
                "execution_ms": _execution_ms(lines),
            }


def _execution_ms(lines: list[str]) -> float | None:
    for line in lines:
        match = re.search(r"Execution Time: ([\d.]+) ms", line)
        if match:
            return float(match.group(1))
    return None


# ---- running -----------------------------------------------------------------------------------


def run(
    url: str,
    small: int = 1_000,
    large: int = 1_000_000,
    rounds: int = 4,
    per_round: int = 150,
    concurrency: int = 4,
) -> dict[str, Any]:
    labels = (_label(small), _label(large))
    urls = [harness.sibling_database(url, f"countersign_bench_scale_{label}") for label in labels]
    separate = all(urls)
    result: dict[str, Any] = {"history_rows": dict(zip(labels, (small, large), strict=True))}
    if separate:
        result["method"] = "two databases, two servers, alternating rounds"
        for target_url in urls:
            harness.migrate(target_url)
        targets = []
        for label, target_url, rows in zip(labels, urls, (small, large), strict=True):
            log(f"scale: loading {rows} historical rows into {label}")
            world, seconds = prepare_target(target_url, rows)
            result[f"load_seconds_{label}"] = round(seconds, 1)
            targets.append(Target(label, target_url, world))
        for target in targets:
            target.server.start()
        try:
            result["scenarios"] = measure(targets, rounds, per_round, concurrency)
            result["server"] = targets[0].server.describe() + " (one per database)"
        finally:
            for target in targets:
                target.server.stop()
        log("scale: EXPLAIN at 1M")
        result["explain_at_large"] = explain(targets[-1].url, targets[-1].world)
        for target_url in urls:
            harness.drop_database(target_url)
    else:
        result["method"] = "one database, measured before and after the bulk load (sequential)"
        world, seconds = prepare_target(url, small)
        target = Target(labels[0], url, world)
        with target.server:
            first = measure([target], rounds, per_round, concurrency)
        result[f"load_seconds_{labels[1]}"] = round(load_history(url, large - small), 1)
        target_large = Target(labels[1], url, world)
        target_large.counter = target.counter
        with target_large.server:
            second = measure([target_large], rounds, per_round, concurrency)
        result["scenarios"] = _merge(first, second, labels)
        result["explain_at_large"] = explain(url, world)
    ratios = [entry["p50_ratio_1m_to_1k"] for entry in result["scenarios"].values()]
    result["p50_ratio_1m_to_1k_worst"] = max(ratios)
    return result


def _label(rows: int) -> str:
    return f"{rows // 1_000_000}m" if rows >= 1_000_000 else f"{rows // 1000}k"


def _merge(first: dict, second: dict, labels: tuple[str, str]) -> dict:
    merged = {}
    for name, entry in first.items():
        a, b = entry[labels[0]], second[name][labels[1]]
        merged[name] = {
            "description": entry["description"],
            labels[0]: a,
            labels[1]: b,
            "p50_ratio_1m_to_1k": round(b["p50_ms"] / a["p50_ms"], 3),
            "rate_ratio_1m_to_1k": round(b["req_per_s"] / a["req_per_s"], 3),
        }
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=150)
    args = parser.parse_args()
    result = run(harness.database_url(), args.small, args.large, args.rounds, args.per_round)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
