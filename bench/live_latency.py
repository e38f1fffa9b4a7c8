"""Live dashboard latency: from the agent's 202 to the event on every connected dashboard.

N websocket clients (logged-in dashboards) are spread over two gunicorn servers (one gthread
worker process each) sharing one PostgreSQL, so half of them hear each event through
LISTEN/NOTIFY from the other process. For each N, every round the agent asks for a gated
delete; the time from its 202 to the row arriving at each client is recorded.

    .venv/bin/python bench/live_latency.py --clients 50 200 500 --rounds 20 --json live.json

The database (TEST_DATABASE_URL or --database-url) is migrated and EMPTIED: use a throwaway
one (scripts/throwaway-postgres.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from simple_websocket.errors import ConnectionClosed  # noqa: E402

from tests.e2e.gunicorn import Gunicorn  # noqa: E402
from tests.e2e.support import login_session, open_ws  # noqa: E402

NEW_ROW = re.compile(r'id="approval-(\d+)"')
PASSWORD = "bench-password"


@dataclass
class Arrivals:
    """When each client first saw each approval row; wakes the waiter when all have."""

    clients: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: dict[int, dict[int, float]] = field(default_factory=dict)
    done: dict[int, threading.Event] = field(default_factory=dict)

    def expect(self, approval_id: int) -> threading.Event:
        with self.lock:
            self.seen.setdefault(approval_id, {})
            event = self.done.setdefault(approval_id, threading.Event())
            if len(self.seen[approval_id]) >= self.clients:
                event.set()
            return event

    def record(self, client: int, approval_ids: set[int], at: float) -> None:
        with self.lock:
            for approval_id in approval_ids:
                times = self.seen.setdefault(approval_id, {})
                if client not in times:
                    times[client] = at
                    if len(times) >= self.clients:
                        self.done.setdefault(approval_id, threading.Event()).set()


class Dashboard:
    """One logged-in dashboard socket and the thread that reads it."""

    def __init__(self, index: int, base_url: str, http, arrivals: Arrivals) -> None:
        self.index = index
        self.ws = open_ws(base_url, http)
        self.arrivals = arrivals
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = self.ws.receive()
                at = time.perf_counter()
                if not self.ready.is_set():
                    self.ready.set()  # the opening resync: rows already pending don't count
                    continue
                ids = {int(i) for i in NEW_ROW.findall(message)}
                if ids:
                    self.arrivals.record(self.index, ids, at)
        except ConnectionClosed:
            pass

    def close(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.ws.close()
        self.thread.join(timeout=5)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def seed(database_url: str, users: int, secrets: int) -> dict:
    """Migrate, empty, and seed: a workspace, owners who log in, secrets to delete, an agent."""
    from flask_migrate import upgrade
    from sqlalchemy import text

    from app import create_app
    from app.auth import hash_password, issue_token
    from app.extensions import db
    from app.models import Membership, Secret, User, Workspace

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "SECRET_KEY": "bench"})
    with app.app_context():
        upgrade()
        tables = [name for name in db.metadata.tables if name != "alembic_version"]
        db.session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        root = Workspace(name="bench")
        db.session.add(root)
        db.session.flush()
        team = Workspace(name="payments", parent_id=root.id)
        db.session.add(team)
        db.session.flush()
        password_hash = hash_password(PASSWORD)
        names = [f"owner{i}" for i in range(users)]
        people = [User(username=name, password_hash=password_hash) for name in names]
        db.session.add_all(people)
        db.session.flush()
        db.session.add_all(
            Membership(workspace_id=root.id, user_id=user.id, role="owner") for user in people
        )
        db.session.add_all(
            Secret(workspace_id=team.id, name=f"S{i}", value="x") for i in range(secrets)
        )
        _, token = issue_token("agent", "bench-agent")
        db.session.commit()
        workspace_id = team.id
        db.engine.dispose()
    app.extensions["countersign_events"].stop()
    return {"users": names, "token": token, "workspace_id": workspace_id}


def run_size(
    clients: int, rounds: int, servers: list[Gunicorn], seeded: dict, next_secret: list[int]
) -> dict:
    arrivals = Arrivals(clients)
    sessions = {
        (server.url, user): login_session(server.url, user, PASSWORD)
        for server in servers
        for user in seeded["users"]
    }
    dashboards = []
    started = time.perf_counter()
    for i in range(clients):
        server = servers[i % len(servers)]
        user = seeded["users"][i % len(seeded["users"])]
        dashboards.append(Dashboard(i, server.url, sessions[(server.url, user)], arrivals))
    for dashboard in dashboards:
        if not dashboard.ready.wait(timeout=60):
            raise SystemExit(f"client {dashboard.index} got no opening resync")
    connect_seconds = time.perf_counter() - started
    agent = requests.Session()
    agent.headers["Authorization"] = f"Bearer {seeded['token']}"
    from_202: list[float] = []
    from_send: list[float] = []
    last_client: list[float] = []
    try:
        for round_ in range(-1, rounds):  # round -1 warms caches and templates: not counted
            server = servers[round_ % len(servers)]
            name = f"S{next_secret[0]}"
            next_secret[0] += 1
            sent = time.perf_counter()
            response = agent.delete(
                f"{server.url}/api/workspaces/{seeded['workspace_id']}/secrets/{name}", timeout=30
            )
            answered = time.perf_counter()
            if response.status_code != 202:
                log = "".join(server.log[-30:])
                raise SystemExit(
                    f"expected 202, got {response.status_code}: {response.text}\n{log}"
                )
            approval_id = response.json()["approval_id"]
            if not arrivals.expect(approval_id).wait(timeout=60):
                got = len(arrivals.seen.get(approval_id, {}))
                raise SystemExit(f"only {got}/{clients} clients got approval {approval_id}")
            times = list(arrivals.seen[approval_id].values())
            if round_ < 0:
                continue
            # An event may beat the 202 to a client (NOTIFY fires at commit): that counts as 0.
            from_202.extend(max(0.0, t - answered) * 1000 for t in times)
            from_send.extend((t - sent) * 1000 for t in times)
            last_client.append(max(0.0, max(times) - answered) * 1000)
    finally:
        for dashboard in dashboards:
            dashboard.close()
    return {
        "clients": clients,
        "rounds": rounds,
        "samples": len(from_202),
        "connect_seconds": round(connect_seconds, 2),
        "p50_ms": round(percentile(from_202, 50), 2),
        "p99_ms": round(percentile(from_202, 99), 2),
        "max_ms": round(max(from_202), 2),
        "from_request_p50_ms": round(percentile(from_send, 50), 2),
        "from_request_p99_ms": round(percentile(from_send, 99), 2),
        "last_client_p50_ms": round(percentile(last_client, 50), 2),
        "last_client_p99_ms": round(percentile(last_client, 99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--rounds", type=int, default=20, help="events timed per client count")
    parser.add_argument("--users", type=int, default=10, help="distinct logged-in users")
    parser.add_argument("--database-url", default=os.environ.get("TEST_DATABASE_URL"))
    parser.add_argument("--json", dest="json_path", help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.database_url or not args.database_url.startswith("postgres"):
        parser.error("needs PostgreSQL: --database-url or TEST_DATABASE_URL")

    seeded = seed(args.database_url, args.users, (args.rounds + 1) * len(args.clients))
    threads = max(args.clients) // 2 + 32  # one thread per socket, plus room for HTTP
    pool = json.dumps({"pool_pre_ping": True, "pool_size": 20, "max_overflow": 20})
    # FLASK_* sets Flask's own keys (config.load_environment); the COUNTERSIGN_ twin serves
    # builds that read only the prefixed variables.
    env = {"FLASK_SQLALCHEMY_ENGINE_OPTIONS": pool, "COUNTERSIGN_SQLALCHEMY_ENGINE_OPTIONS": pool}
    results = []
    with (
        Gunicorn(args.database_url, threads=threads, secret_key="bench", env=env) as first,
        Gunicorn(args.database_url, threads=threads, secret_key="bench", env=env) as second,
    ):
        next_secret = [0]
        for clients in args.clients:
            result = run_size(clients, args.rounds, [first, second], seeded, next_secret)
            results.append(result)
            print(
                f"N={clients:>4}  p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms"
                f"  (last client p50 {result['last_client_p50_ms']:.1f} /"
                f" p99 {result['last_client_p99_ms']:.1f} ms; {result['samples']} samples)",
                flush=True,
            )
    report = {
        "benchmark": "live_latency",
        "metric": "ms from the agent's 202 to the row arriving at each dashboard socket",
        "servers": "2 gunicorn processes, 1 gthread worker each, clients split evenly",
        "threads_per_worker": threads,
        "rounds": args.rounds,
        "machine": {"cores": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        "results": results,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
