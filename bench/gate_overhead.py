"""Gate overhead: one route, the gate's three answers, against an ungated baseline.

Route: ``DELETE /api/workspaces/<leaf>/secrets/<name>`` (leaf at depth 3: acme / prod / leaf-0).

- floor: ``GET /bench/ping``, authentication only;
- baseline: ``DELETE /bench/workspaces/<leaf>/secrets/<name>``: the route's describe step and
  view body with no gate (bench-only blueprint), service token, 204;
- passthrough: the gated route, service token (not gated by the policy), 204;
- pending_202: the gated route, agent token, a pending request exists: 202;
- consume: the gated route, agent token, an approved request exists: consume + delete, 204.

Each round runs every scenario once (order rotated per round) with fresh secrets prepared
untimed; ratios are taken within a round and the median over rounds is reported, so a noisy
neighbour slows both sides of a ratio alike. Statement counts come from the Flask test client
in-process (bench/statements.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import harness
from bench.harness import (
    Http,
    Server,
    World,
    add_secrets,
    approve,
    latency_summary,
    log,
    median,
    request_approval,
    secret_path,
    timed_run,
)


@dataclass
class Scenario:
    name: str
    description: str
    expected: int
    prepare: Callable[[str, int], list[Any]]  # (tag, count) -> items
    send: Callable[[Http, Any], int]


def scenarios(server: Server, world: World, url: str) -> list[Scenario]:
    leaf = world.leaves[0]
    service, agent = world.tokens["service"], world.tokens["agent"]

    def fresh_secrets(tag: str, count: int) -> list[str]:
        names = [f"{tag}-{i}" for i in range(count)]
        add_secrets(url, [(leaf, name) for name in names])
        return names

    pending_pool = fresh_secrets("pending-pool", 32)
    harness.parallel(
        pending_pool, lambda h, n: request_approval(h, world, leaf, n), server.base_url
    )

    def approved_secrets(tag: str, count: int) -> list[str]:
        names = fresh_secrets(tag, count)
        ids = harness.parallel(
            names, lambda h, n: request_approval(h, world, leaf, n), server.base_url
        )
        harness.parallel(ids, lambda h, i: approve(h, world, i), server.base_url)
        return names

    def delete(path_of: Callable[[str], str], token: str) -> Callable[[Http, Any], int]:
        return lambda http, name: http.request("DELETE", path_of(name), token)[0]

    return [
        Scenario(
            "floor",
            "GET /bench/ping: bearer authentication only",
            200,
            lambda tag, n: [None] * n,
            lambda http, _: http.request("GET", "/bench/ping", service)[0],
        ),
        Scenario(
            "baseline",
            "ungated DELETE of a secret (same describe + view, no gate), service token",
            204,
            fresh_secrets,
            delete(lambda n: f"/bench/workspaces/{leaf}/secrets/{n}", service),
        ),
        Scenario(
            "passthrough",
            "gated DELETE, service token: the gate lets it through",
            204,
            fresh_secrets,
            delete(lambda n: secret_path(leaf, n), service),
        ),
        Scenario(
            "pending_202",
            "gated DELETE, agent token, pending request exists: 202",
            202,
            lambda tag, n: [pending_pool[i % len(pending_pool)] for i in range(n)],
            delete(lambda n: secret_path(leaf, n), agent),
        ),
        Scenario(
            "consume",
            "gated DELETE, agent token, approved request exists: consume + delete, 204",
            204,
            approved_secrets,
            delete(lambda n: secret_path(leaf, n), agent),
        ),
    ]


def measure_http(
    url: str, world: World, rounds: int, per_round: int, concurrency: int
) -> dict[str, Any]:
    with Server(url) as server:
        plan = scenarios(server, world, url)
        log(f"gate overhead: warm-up ({server.describe()})")
        for scenario in plan:
            timed_run(
                server.base_url, scenario.prepare(f"warm-{scenario.name}", 60), scenario.send, 4
            )
        samples: dict[str, list[harness.Timed]] = {s.name: [] for s in plan}
        cpu: dict[str, list[dict[str, float]]] = {s.name: [] for s in plan}
        for r in range(rounds):
            order = plan[r % len(plan) :] + plan[: r % len(plan)]
            for scenario in order:
                items = scenario.prepare(f"r{r}-{scenario.name}", per_round)
                meter = harness.CpuMeter(server)
                samples[scenario.name].append(
                    timed_run(server.base_url, items, scenario.send, concurrency)
                )
                cpu[scenario.name].append(meter.read())
            rates = {name: round(runs[-1].rate) for name, runs in samples.items()}
            log(f"gate overhead: round {r + 1}/{rounds} req/s {rates}")
        server_line = server.describe()
    results: dict[str, Any] = {}
    for scenario in plan:
        runs = samples[scenario.name]
        latencies = [x for run in runs for x in run.latencies]
        statuses: dict[str, int] = {}
        for run in runs:
            for status, count in run.statuses.items():
                statuses[str(status)] = statuses.get(str(status), 0) + count
        results[scenario.name] = {
            "description": scenario.description,
            "expected_status": scenario.expected,
            "statuses": statuses,
            "unexpected": sum(c for s, c in statuses.items() if s != str(scenario.expected)),
            "req_per_s": round(median([run.rate for run in runs]), 1),
            "req_per_s_rounds": [round(run.rate, 1) for run in runs],
            **latency_summary(latencies),
            # CPU per request is steadier than req/s on a shared machine: noise from other
            # processes slows requests down but does not bill the workers' CPU.
            "cpu_ms_per_request": {
                part: round(
                    1000
                    * sum(c[part] for c in cpu[scenario.name])
                    / sum(len(run.latencies) for run in runs),
                    2,
                )
                for part in ("gunicorn_workers", "postgresql")
            },
        }
    base_cpu = sum(results["baseline"]["cpu_ms_per_request"].values())
    for scenario in plan:
        cpu = sum(results[scenario.name]["cpu_ms_per_request"].values())
        results[scenario.name]["cpu_ratio_to_baseline"] = round(cpu / base_cpu, 3)
        mine, base = samples[scenario.name], samples["baseline"]
        results[scenario.name]["rate_ratio_to_baseline"] = round(
            median([m.rate / b.rate for m, b in zip(mine, base, strict=True)]), 3
        )
        results[scenario.name]["p50_ratio_to_baseline"] = round(
            median(
                [
                    harness.percentile(sorted(m.latencies), 50)
                    / harness.percentile(sorted(b.latencies), 50)
                    for m, b in zip(mine, base, strict=True)
                ]
            ),
            3,
        )
    return {
        "route": "DELETE /api/workspaces/<leaf>/secrets/<name>, leaf at depth 3",
        "server": server_line,
        "concurrency": concurrency,
        "rounds": rounds,
        "requests_per_round": per_round,
        "ratios": "req/s and p50: median over rounds of (scenario / baseline) measured in the "
        "same round; cpu: (workers + PostgreSQL CPU per request) / the baseline's",
        "scenarios": results,
    }


def count_statements(url: str, world: World) -> dict[str, Any]:
    """SQL statements per request for each gate answer, listed, via the Flask test client."""
    from app.extensions import db
    from bench.statements import recording, summarise

    leaf = world.leaves[0]
    names = ["stmt-warm", "stmt-base", "stmt-pass", "stmt-gate", "stmt-deny"]
    add_secrets(url, [(leaf, name) for name in names])
    service, agent, alice = (world.tokens[n] for n in ("service", "agent", "alice"))
    out: dict[str, Any] = {}
    with harness.local_app(url) as app, recording(db.engine) as recorder:
        client = app.test_client()

        def run(method: str, path: str, token: str, body: Any = None):
            db.session.remove()  # each request starts like a fresh one on the server
            recorder.reset()
            recorder.active = True
            try:
                response = client.open(
                    path, method=method, headers={"Authorization": f"Bearer {token}"}, json=body
                )
            finally:
                recorder.active = False
            return response

        def measured(label: str, method: str, path: str, token: str, body: Any = None):
            response = run(method, path, token, body)
            out[label] = summarise(recorder, response.status_code)
            return response

        decision = "/api/approvals/{}/decision"
        # Warm-up: a whole cycle, so first-use costs (metadata, caches) are not counted.
        run("GET", "/bench/ping", service)
        approval_id = run("DELETE", secret_path(leaf, "stmt-warm"), agent).get_json()["approval_id"]
        run("POST", decision.format(approval_id), alice, {"decision": "approve", "reason": "w"})
        run("DELETE", secret_path(leaf, "stmt-warm"), agent)

        measured("floor_auth_only", "GET", "/bench/ping", service)
        measured(
            "baseline_ungated_delete",
            "DELETE",
            f"/bench/workspaces/{leaf}/secrets/stmt-base",
            service,
        )
        measured("passthrough", "DELETE", secret_path(leaf, "stmt-pass"), service)
        first = measured("pending_202_first", "DELETE", secret_path(leaf, "stmt-gate"), agent)
        measured("pending_202_retry", "DELETE", secret_path(leaf, "stmt-gate"), agent)
        approval_id = first.get_json()["approval_id"]
        measured(
            "human_approve",
            "POST",
            decision.format(approval_id),
            alice,
            {"decision": "approve", "reason": "bench"},
        )
        measured("consume_204", "DELETE", secret_path(leaf, "stmt-gate"), agent)
        denied = run("DELETE", secret_path(leaf, "stmt-deny"), agent).get_json()["approval_id"]
        run("POST", decision.format(denied), alice, {"decision": "deny", "reason": "no"})
        measured("denied_403", "DELETE", secret_path(leaf, "stmt-deny"), agent)
    goal = {
        "pending_202_retry": out["pending_202_retry"]["gate_statements"],
        "consume_204": out["consume_204"]["gate_statements"],
    }
    return {
        "how": "before_cursor_execute hook in-process (Flask test client, same PostgreSQL); "
        "phases by the issuing app function; commits and pool pre-pings counted apart",
        "gate_statements_per_decision": goal,
        "goal": "1 gate statement for the 202 retry, 1 for the consume",
        "requests": out,
    }


def run(url: str, rounds: int = 5, per_round: int = 300, concurrency: int = 4) -> dict[str, Any]:
    harness.empty_database(url)
    world = harness.seed(url, leaves=1, agents=1)
    log("gate overhead: counting statements in-process")
    statements = count_statements(url, world)
    result = measure_http(url, world, rounds, per_round, concurrency)
    result["statements"] = statements
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    url = harness.database_url()
    print(json.dumps(run(url, args.rounds, args.per_round, args.concurrency), indent=2))


if __name__ == "__main__":
    main()
