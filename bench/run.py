"""Run the benchmarks, write bench/results.json and the table in bench/README.md.

    python -m bench.run                      # everything (scripts/bench.sh does this)
    python -m bench.run --only gate,race     # a subset: other sections of results.json are kept
    python -m bench.run --quick              # small sizes, to check the scripts work

Sections: gate (gate_overhead), race, scale, live (live_fanout), throughput, soak. Needs
DATABASE_URL or TEST_DATABASE_URL: a throwaway PostgreSQL database, which is EMPTIED.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import gate_overhead, harness, preflight, race, scale, soak, throughput
from bench.harness import log

BENCH = Path(__file__).absolute().parent
SECTIONS = ("gate", "race", "scale", "live", "throughput", "soak")
KEYS = {
    "gate": "gate_overhead",
    "race": "race",
    "scale": "scale",
    "live": "live_fanout",
    "throughput": "throughput",
    "soak": "soak",
}


def live_fanout(url: str, clients: list[int], rounds: int) -> dict[str, Any]:
    """Run bench/live_latency.py in its own process (it starts its own two gunicorn servers)."""
    with tempfile.TemporaryDirectory(prefix="countersign-live-") as tmp:
        out = Path(tmp) / "live.json"
        command = [
            sys.executable,
            str(BENCH / "live_latency.py"),
            "--clients",
            *map(str, clients),
            "--json",
            str(out),
            "--rounds",
            str(rounds),
            "--database-url",
            url,
        ]
        started = time.monotonic()
        done = subprocess.run(
            command,
            cwd=harness.ROOT,
            env={**os.environ, "TEST_DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if done.returncode != 0 or not out.exists():
            return {
                "error": f"bench/live_latency.py exited {done.returncode}",
                "stderr": done.stderr[-2000:],
                "stdout": done.stdout[-1000:],
            }
        report = json.loads(out.read_text())
    report["command"] = " ".join(["bench/live_latency.py", *command[2:]]).replace(str(out), "…")
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def sections(args) -> dict[str, Callable[[str], dict[str, Any]]]:
    quick = args.quick
    return {
        "gate": lambda url: gate_overhead.run(
            url, rounds=2 if quick else 5, per_round=100 if quick else 300
        ),
        "race": lambda url: race.run(url, trials=args.race_trials or (10 if quick else 200)),
        "scale": lambda url: scale.run(
            url,
            large=100_000 if quick else args.scale_rows,
            rounds=2 if quick else 4,
            per_round=60 if quick else 150,
        ),
        "live": lambda url: live_fanout(
            url, args.live_clients[:1] if quick else args.live_clients, 5 if quick else 20
        ),
        "throughput": lambda url: throughput.run(
            url,
            steps=(1, 2, 4) if quick else (1, 2, 4, 8, 16, 32),
            step_seconds=4 if quick else 8,
            profile_seconds=5 if quick else 12,
        ),
        "soak": lambda url: soak.run(
            url,
            soak.parser().parse_args(
                ["--seconds", str(10 if quick else args.soak_seconds), "--no-preflight"]
            ),
        ),
    }


# ---- the README table --------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    machine = results.get("machine", {})
    gate = results.get("gate_overhead", {})
    if "scenarios" in gate:
        s = gate["scenarios"]
        for name in ("baseline", "passthrough", "pending_202", "consume"):
            if name in s:
                x = s[name]
                rows.append(
                    (
                        f"gate: {name}",
                        f"{x['req_per_s']:.0f} req/s, p50 {x['p50_ms']:.1f} ms, "
                        f"p99 {x['p99_ms']:.1f} ms; x{x['rate_ratio_to_baseline']:.2f} "
                        f"baseline req/s; CPU/req {x['cpu_ms_per_request']['gunicorn_workers']:.2f}"
                        f" ms workers + {x['cpu_ms_per_request']['postgresql']:.2f} ms PostgreSQL"
                        f" = x{x.get('cpu_ratio_to_baseline', float('nan')):.2f} baseline",
                    )
                )
        per = gate.get("statements", {}).get("requests", {})
        if per:
            rows.append(
                (
                    "SQL statements / request",
                    ", ".join(
                        f"{k} {v['statements']} (gate {v['gate_statements']})"
                        for k, v in per.items()
                        if k in ("pending_202_retry", "consume_204", "passthrough", "human_approve")
                    ),
                )
            )
    if "executions_histogram" in results.get("race", {}):
        r = results["race"]
        h = r["executions_histogram"]
        rows.append(
            (
                f"race: {r['trials']} trials x {r['concurrency']} retries",
                f"0 executions: {h['0']}, exactly 1: {h['1']}, 2+: {h['2+']}; "
                f"5xx {r['server_errors_5xx']}",
            )
        )
    sc = results.get("scale", {})
    if "scenarios" in sc:
        rows.append(
            (
                "scale: p50 latency 1M / 1k rows",
                ", ".join(
                    f"{k} x{v['p50_ratio_1m_to_1k']:.2f}" for k, v in sc["scenarios"].items()
                ),
            )
        )
    live = results.get("live_fanout", {})
    if "results" in live:
        rows.append(
            (
                "live fan-out: 202 → websocket frame",
                ", ".join(
                    f"N={x['clients']} p50 {x['p50_ms']:.0f} ms p99 {x['p99_ms']:.0f} ms"
                    for x in live["results"]
                ),
            )
        )
    elif live:
        rows.append(("live fan-out", live.get("skipped") or live.get("error", "?")))
    tp = results.get("throughput", {})
    if tp.get("ceiling_cycles_per_s"):
        rows.append(
            (
                "throughput ceiling (agent→approve→retry)",
                f"{tp['ceiling_cycles_per_s']:.0f} cycles/s "
                f"({tp['ceiling_http_requests_per_s']:.0f} req/s) at concurrency "
                f"{tp['ceiling_concurrency']}, cycle p50 {tp['ceiling_cycle_p50_ms']:.0f} ms; "
                f"knee: {tp.get('knee_cycles_per_s', 0):.0f} cycles/s at concurrency "
                f"{tp.get('knee_concurrency')}, p50 {tp.get('knee_cycle_p50_ms', 0):.0f} ms",
            )
        )
        costs = tp.get("profile", {}).get("top_costs")
        if costs:
            rows.append(
                (
                    "top worker CPU costs (py-spy)",
                    "; ".join(f"{c['what']} {c['share']:.0%}" for c in costs),
                )
            )
    so = results.get("soak", {})
    if "requests" in so:
        rows.append(
            (
                f"soak {so['seconds']:.0f} s",
                f"{so['requests']} requests, {so['secrets_deleted']} deletes = "
                f"{so['agent_204s']} 204s, {so['violation_count']} violations, "
                f"{'OK' if so['ok'] else 'FAILED'}",
            )
        )
    head = (
        f"Measured {results.get('measured_at', '?')} on {machine.get('cores', '?')} cores "
        f"({machine.get('cpu_model', '?')}), PostgreSQL {machine.get('postgresql', '?')}, "
        "gunicorn 2 gthread workers x 16 threads, loopback."
    )
    lines = [head, "", "| benchmark | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    notes = results.get("preflight", {})
    if notes.get("workaround"):
        lines += [
            "",
            "**Run with a workaround**: the preflight found the known dedup-INSERT issue "
            "(see bench/preflight.py); servers ran with psycopg `prepare_threshold=None`.",
        ]
    return "\n".join(lines)


def update_readme(results: dict[str, Any], readme: Path) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{table(results)}\n{end}{after}")


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--quick", action="store_true", help="small sizes (minutes → seconds)")
    parser.add_argument("--output", default=str(BENCH / "results.json"))
    parser.add_argument("--readme", default=str(BENCH / "README.md"))
    parser.add_argument("--scale-rows", type=int, default=1_000_000)
    parser.add_argument("--race-trials", type=int)
    parser.add_argument("--soak-seconds", type=float, default=30)
    parser.add_argument("--live-clients", type=int, nargs="+", default=[50, 200, 500])
    args = parser.parse_args()
    chosen = [s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip()]
    chosen = [s for s in chosen if s not in set(args.skip.split(","))]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    url = harness.database_url()
    output = Path(args.output)
    results: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {}
    results["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["machine"] = harness.machine(url)
    results["machine"]["server"] = harness.Server(url).describe()
    results["quick"] = args.quick
    log("preflight")
    results["preflight"] = preflight.run(url)
    failed = []
    runners = sections(args)
    for name in chosen:
        log(f"== {name}")
        started = time.monotonic()
        try:
            section = runners[name](url)
        except Exception as error:
            traceback.print_exc()
            section = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
            failed.append(name)
        section["section_seconds"] = round(time.monotonic() - started, 1)
        section["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        results[KEYS[name]] = section
        if name == "race" and not section.get("exactly_once", False):
            failed.append("race (not exactly once)")
        if name == "soak" and not section.get("ok", False):
            failed.append("soak (violations)")
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    update_readme(results, Path(args.readme))
    print(table(results))
    log(f"wrote {output} and the table in {args.readme}")
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
