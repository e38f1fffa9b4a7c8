"""Throughput ceiling: full approval cycles per second, ramping concurrency until errors or a fall.

One cycle: the agent's DELETE of a secret (202, pending created) → a human approves (200) →
the agent retries (204: consumed, secret deleted). Each client thread runs cycles back to back
on its own keep-alive connection; secrets are spread over 8 leaf workspaces and 4 agents. The
ceiling is the best rate of a step with no error at all. CPU seconds of the gunicorn workers,
of PostgreSQL and of the load generator itself are read from /proc for every step, and one run
at the best concurrency is profiled with py-spy (bench/profile.py summarises it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import harness, profile
from bench.harness import Http, Server, World, latency_summary, log, secret_path

LEAVES, AGENTS = 8, 4


class Cycles:
    """Hands out fresh secrets and runs agent → human → agent cycles, counting outcomes."""

    def __init__(self, world: World, names: list[tuple[int, str]]) -> None:
        self.world = world
        self.names = iter(names)
        self.lock = threading.Lock()
        self.agents = itertools.cycle([f"agent-{i}" for i in range(AGENTS)])

    def next(self) -> tuple[int, str, str] | None:
        with self.lock:
            item = next(self.names, None)
            agent = next(self.agents)
        return None if item is None else (*item, agent)

    def one(self, http: Http) -> str | None:
        """Run one cycle; None when it went as it should, else what went wrong."""
        item = self.next()
        if item is None:
            return "out of prepared secrets"
        workspace_id, name, agent = item
        path = secret_path(workspace_id, name)
        status, body = http.json("DELETE", path, self.world.tokens[agent])
        if status != 202:
            return f"request {status}"
        status, _ = http.json(
            "POST",
            f"/api/approvals/{body['approval_id']}/decision",
            self.world.tokens["alice"],
            {"decision": "approve", "reason": "bench"},
        )
        if status != 200:
            return f"decision {status}"
        status, _ = http.request("DELETE", path, self.world.tokens[agent])
        if status != 204:
            return f"retry {status}"
        return None


def run_step(server: Server, cycles: Cycles, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop: ``concurrency`` threads run cycles for ``seconds``."""
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ready = threading.Barrier(concurrency + 1)

    def worker() -> None:
        http = Http(server.base_url)
        http.warm()
        mine, failed = [], {}
        ready.wait()
        while not stop.is_set():
            start = time.perf_counter()
            try:
                problem = cycles.one(http)
            except OSError as error:
                problem = f"connection {type(error).__name__}"
                http.close()
            if problem is None:
                mine.append(time.perf_counter() - start)
            else:
                failed[problem] = failed.get(problem, 0) + 1
        with lock:
            latencies.extend(mine)
            for key, count in failed.items():
                errors[key] = errors.get(key, 0) + count
        http.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    meter = harness.CpuMeter(server)
    began = time.perf_counter()
    with harness.WaitSampler(server.database_url) as waits:
        time.sleep(seconds)
    stop.set()
    wall = time.perf_counter() - began
    cpu = meter.read()
    for thread in threads:
        thread.join()
    completed = len(latencies)
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "cycles": completed,
        "cycles_per_s": round(completed / wall, 1),
        "http_requests_per_s": round(3 * completed / wall, 1),
        "errors": errors,
        "cycle_latency": latency_summary(latencies),
        "cpu_seconds": cpu,
        "cpu_ms_per_cycle": {
            k: round(1000 * v / completed, 2) if completed else None for k, v in cpu.items()
        },
        "machine_busy": round(cpu["machine_busy"] / (wall * (os.cpu_count() or 1)), 2),
        "db_backends_by_state": waits.summary(),
    }


def profile_step(
    server: Server, cycles: Cycles, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Run a step at ``concurrency`` under py-spy (all workers) and summarise the profile."""
    py_spy = shutil.which("py-spy") or str(harness.venv_bin("py-spy"))
    if not Path(py_spy).exists():
        return {"skipped": "py-spy is not installed (pip install -r requirements.txt)"}
    output = harness.log_dir() / "throughput.speedscope.json"
    recorder = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(server.process.pid),
            "--subprocesses",
            "--nonblocking",
            "--gil",  # only the thread holding the GIL: Python CPU time, not threads waiting
            "--rate",
            "200",
            "--duration",
            str(int(seconds) + 2),
            "--format",
            "speedscope",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # let py-spy attach before the load starts
    step = run_step(server, cycles, concurrency, seconds)
    _, stderr = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not output.exists():
        return {"skipped": f"py-spy failed: {stderr.strip()[-500:]}", "step": step}
    app_dir = str(harness.ROOT / "app") + "/"
    summary = profile.summarise(output, app_dir)
    kept = Path(__file__).absolute().parent / "profiles"
    kept.mkdir(exist_ok=True)
    shutil.copy(output, kept / "throughput.speedscope.json")
    return {
        "step_under_profiler": step,
        "speedscope_file": "bench/profiles/throughput.speedscope.json",
        **summary,
    }


def run(
    url: str,
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
    step_seconds: float = 8,
    profile_seconds: float = 12,
    do_profile: bool = True,
) -> dict[str, Any]:
    harness.empty_database(url)
    world = harness.seed(url, leaves=LEAVES, agents=AGENTS)
    budget = int(250 * (step_seconds * len(steps) + profile_seconds + 4))
    names = [(world.leaves[i % LEAVES], f"tp-{i}") for i in range(budget)]
    harness.add_secrets(url, names)
    cycles = Cycles(world, names)
    results: list[dict[str, Any]] = []
    with Server(url) as server:
        run_step(server, cycles, 4, 2)  # warm-up, not reported
        best: dict[str, Any] | None = None
        falling = 0
        for concurrency in steps:
            step = run_step(server, cycles, concurrency, step_seconds)
            results.append(step)
            log(
                f"throughput: c={concurrency} {step['cycles_per_s']} cycles/s "
                f"p50 {step['cycle_latency']['p50_ms']} ms errors {step['errors']}"
            )
            if step["errors"]:
                break
            if best is None or step["cycles_per_s"] > best["cycles_per_s"]:
                best, falling = step, 0
            elif step["cycles_per_s"] < 0.9 * best["cycles_per_s"]:
                falling += 1
                if falling == 2:
                    break
        # The knee: the lowest concurrency within 10% of the best rate (more only adds queueing).
        knee = (
            min(
                (s for s in results if not s["errors"]),
                key=lambda s: (s["cycles_per_s"] < 0.9 * best["cycles_per_s"], s["concurrency"]),
            )
            if best
            else None
        )
        profiled = (
            profile_step(server, cycles, knee["concurrency"], profile_seconds)
            if do_profile and best
            else {"skipped": "not requested" if not do_profile else "no error-free step"}
        )
        server_line = server.describe()
    return {
        "cycle": "agent DELETE → 202; human approve → 200; agent retry → 204",
        "server": server_line,
        "ceiling_cycles_per_s": best["cycles_per_s"] if best else None,
        "ceiling_http_requests_per_s": best["http_requests_per_s"] if best else None,
        "ceiling_concurrency": best["concurrency"] if best else None,
        "ceiling_cycle_p50_ms": best["cycle_latency"]["p50_ms"] if best else None,
        "ceiling_cpu_ms_per_cycle": best["cpu_ms_per_cycle"] if best else None,
        "knee_concurrency": knee["concurrency"] if knee else None,
        "knee_cycles_per_s": knee["cycles_per_s"] if knee else None,
        "knee_cycle_p50_ms": knee["cycle_latency"]["p50_ms"] if knee else None,
        "steps": results,
        "profile": profiled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,2,4,8,16,32")
    parser.add_argument("--step-seconds", type=float, default=8)
    parser.add_argument("--profile-seconds", type=float, default=12)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    steps = tuple(int(x) for x in args.steps.split(","))
    result = run(
        harness.database_url(), steps, args.step_seconds, args.profile_seconds, not args.no_profile
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
