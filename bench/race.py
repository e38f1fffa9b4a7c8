"""Race: many concurrent retries of one approved request execute it exactly once.

Each trial prepares a secret with an approved ``secret.delete`` approval, then releases
``--concurrency`` threads (64 by default) through a barrier, each sending the identical agent
DELETE over its own keep-alive connection to gunicorn. Executions are the 204 answers; the
database is checked afterwards too (the approval consumed once, the secret gone). Prints how
many trials executed 0, 1 and 2+ times: anything but "1" every time is a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from bench import harness, preflight
from bench.harness import Http, Server, approve, log, request_approval, secret_path


def run(url: str, trials: int = 200, concurrency: int = 64) -> dict[str, Any]:
    harness.empty_database(url)
    world = harness.seed(url, leaves=1, agents=1)
    leaf = world.leaves[0]
    agent = world.tokens["agent"]
    names = [f"race-{t}" for t in range(trials)]
    harness.add_secrets(url, [(leaf, name) for name in names])
    statuses = [[0] * concurrency for _ in range(trials)]
    sent_at = [[0.0] * concurrency for _ in range(trials)]
    errors: list[str] = []
    with Server(url) as server:
        log(f"race: preparing {trials} approved approvals")
        ids = harness.parallel(
            names, lambda h, n: request_approval(h, world, leaf, n), server.base_url
        )
        harness.parallel(ids, lambda h, i: approve(h, world, i), server.base_url)
        start = threading.Barrier(concurrency + 1)
        done = threading.Barrier(concurrency + 1)

        def retrier(slot: int) -> None:
            http = Http(server.base_url)
            for t in range(trials):
                http.warm()
                start.wait()
                sent_at[t][slot] = time.perf_counter()
                try:
                    statuses[t][slot] = http.request("DELETE", secret_path(leaf, names[t]), agent)[
                        0
                    ]
                except OSError as error:
                    errors.append(f"trial {t}: {error!r}")
                    statuses[t][slot] = -1
                    http.close()
                done.wait()
            http.close()

        threads = [threading.Thread(target=retrier, args=(i,)) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        log(f"race: {trials} trials x {concurrency} concurrent retries")
        began = time.perf_counter()
        durations = []
        for _ in range(trials):
            t0 = time.perf_counter()
            start.wait()
            done.wait()
            durations.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - began
        for thread in threads:
            thread.join()
        server_line = server.describe()

    with harness.connect(url) as conn:
        rows = dict(
            conn.execute(
                "SELECT id, status FROM approval_requests WHERE id = ANY(%s)", (ids,)
            ).fetchall()
        )
        remaining = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM secrets WHERE workspace_id = %s AND name = ANY(%s)",
                (leaf, names),
            ).fetchall()
        }
    histogram = {"0": 0, "1": 0, "2+": 0}
    all_statuses: dict[str, int] = {}
    disagreements = []
    for t in range(trials):
        executions = statuses[t].count(204)
        histogram["0" if executions == 0 else "1" if executions == 1 else "2+"] += 1
        for status in statuses[t]:
            all_statuses[str(status)] = all_statuses.get(str(status), 0) + 1
        in_db = (rows.get(ids[t]) == "consumed") + (names[t] not in remaining)
        if (executions == 1) != (in_db == 2):
            disagreements.append(
                {
                    "trial": t,
                    "204s": executions,
                    "approval": rows.get(ids[t]),
                    "secret_deleted": names[t] not in remaining,
                }
            )
    spreads = sorted(max(s) - min(s) for s in sent_at)
    return {
        "trials": trials,
        "concurrency": concurrency,
        "server": server_line,
        "executions_histogram": histogram,
        "exactly_once": histogram["1"] == trials and not disagreements and not errors,
        "statuses": all_statuses,
        "server_errors_5xx": sum(c for s, c in all_statuses.items() if s.startswith("5")),
        "database_disagreements": disagreements[:10],
        "client_errors": errors[:10],
        "send_spread_ms_p50": round(harness.percentile(spreads, 50) * 1000, 2),
        "trial_ms_p50": round(harness.percentile(sorted(durations), 50) * 1000, 1),
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--no-preflight",
        dest="preflight",
        action="store_false",
        help="skip bench/preflight.py (its workaround for a known issue, when needed)",
    )
    args = parser.parse_args()
    url = harness.database_url()
    checked = preflight.run(url) if args.preflight else None
    result = run(url, args.trials, args.concurrency)
    result["preflight"] = checked
    print(json.dumps(result, indent=2))
    histogram = result["executions_histogram"]
    print(
        f"race: {result['trials']} trials x {result['concurrency']} retries: "
        f"0 executions {histogram['0']}, 1 execution {histogram['1']}, 2+ {histogram['2+']}",
        file=sys.stderr,
    )
    sys.exit(0 if result["exactly_once"] and not result["server_errors_5xx"] else 1)


if __name__ == "__main__":
    main()
