"""What every benchmark shares: the database, a gunicorn server, a seeded world, an HTTP client.

The benchmarks drive Countersign through its HTTP API on the production server (gunicorn,
gthread workers) and PostgreSQL, on loopback only. They touch the database directly only to
prepare data in bulk (users, tokens, secrets, historical rows) and to check invariants.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).absolute().parent.parent
SECRET_KEY = "countersign-bench-secret-key"  # fixed, shared by every worker and the seeder
PASSWORD = "bench password"  # every seeded human's
STARTED = time.monotonic()
# Extra environment for every server the benchmarks start (set by run.py's preflight when a
# known issue needs a configuration workaround; recorded in the results when it does).
SERVER_ENV: dict[str, str] = {}


def log(message: str) -> None:
    """Progress on stderr, so stdout stays free for results."""
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---- the database ------------------------------------------------------------------------------


def database_url() -> str:
    url = os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if not url or not url.startswith(("postgres://", "postgresql")):
        sys.exit("set DATABASE_URL (or TEST_DATABASE_URL) to a PostgreSQL database")
    return url


def libpq_url(url: str) -> str:
    """The URL psycopg understands (no SQLAlchemy driver suffix)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def connect(url: str, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(libpq_url(url), autocommit=autocommit)


def table_names(url: str) -> list[str]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename <> 'alembic_version' ORDER BY tablename"
        ).fetchall()
    return [row[0] for row in rows]


def empty_database(url: str) -> None:
    """Every table emptied (whatever tables the migrations made), identities restarted."""
    names = table_names(url)
    if names:
        with connect(url) as conn:
            conn.execute(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")


def migrate(url: str) -> None:
    """Bring a database to the newest schema, the way production does."""
    env = {**os.environ, "DATABASE_URL": url, "SECRET_KEY": SECRET_KEY}
    done = subprocess.run(
        [str(venv_bin("flask")), "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migration failed:\n{done.stderr[-3000:]}")


def sibling_database(url: str, name: str) -> str | None:
    """Create (or recreate) database ``name`` on the same server; None if not permitted."""
    parts = urlsplit(libpq_url(url))
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as error:
        log(f"cannot create database {name}: {error}")
        return None
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(url: str) -> None:
    parts = urlsplit(libpq_url(url))
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parts.path.lstrip("/")}" WITH (FORCE)')


def venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


# ---- an in-process app (seeding, statement counts) ---------------------------------------------


@contextmanager
def local_app(url: str, **config: Any) -> Iterator[Any]:
    """The app (with the bench blueprint) bound to ``url``, inside an app context."""
    from app.extensions import db
    from bench.bench_app import make_app

    app = make_app(
        SQLALCHEMY_DATABASE_URI=url,
        SECRET_KEY=SECRET_KEY,
        COUNTERSIGN_LOG_LEVEL="WARNING",
        **config,
    )
    try:
        with app.app_context():
            yield app
            db.session.remove()
            db.engine.dispose()
    finally:
        publisher = app.extensions.get("countersign_events")
        if publisher is not None and hasattr(publisher, "stop"):
            publisher.stop()


# ---- the seeded world --------------------------------------------------------------------------


@dataclass
class World:
    """A tree acme → prod → leaf-0..n-1, its people and tokens (plaintexts by name).

    alice owns acme (so she may decide anything); carol approves on prod. Agents are unscoped;
    ``service`` is the control plane (not gated).
    """

    ws: dict[str, int] = field(default_factory=dict)
    leaves: list[int] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    password: str = PASSWORD

    def auth(self, name: str) -> str:
        return self.tokens[name]


def seed(url: str, *, leaves: int = 1, agents: int = 1, humans: Iterable[str] = ()) -> World:
    """Create the tree, the humans and the tokens through the app's own models and helpers."""
    from app.auth import hash_password, issue_token
    from app.extensions import db
    from app.models import Membership, User, Workspace

    world = World()
    with local_app(url):
        acme = Workspace(name="acme")
        db.session.add(acme)
        db.session.flush()
        prod = Workspace(name="prod", parent_id=acme.id)
        db.session.add(prod)
        db.session.flush()
        world.ws = {"acme": acme.id, "prod": prod.id}
        for i in range(leaves):
            leaf = Workspace(name=f"leaf-{i}", parent_id=prod.id)
            db.session.add(leaf)
            db.session.flush()
            world.ws[leaf.name] = leaf.id
            world.leaves.append(leaf.id)
        password_hash = hash_password(PASSWORD)  # once: scrypt is slow on purpose
        people = {
            name: User(username=name, password_hash=password_hash)
            for name in ("alice", "carol", *humans)
        }
        db.session.add_all(people.values())
        db.session.flush()
        db.session.add(Membership(workspace_id=acme.id, user_id=people["alice"].id, role="owner"))
        db.session.add(
            Membership(workspace_id=prod.id, user_id=people["carol"].id, role="approver")
        )
        for name in humans:
            db.session.add(
                Membership(workspace_id=acme.id, user_id=people[name].id, role="approver")
            )
        specs: list[tuple[str, str, Any]] = [("service", "service", None)]
        specs += [(f"agent-{i}", "agent", None) for i in range(agents)]
        specs += [(name, "user", user) for name, user in people.items()]
        for name, kind, user in specs:
            _, plaintext = issue_token(kind, name, user=user)
            world.tokens[name] = plaintext
        db.session.commit()
    world.tokens["agent"] = world.tokens["agent-0"]
    return world


def add_secrets(url: str, pairs: Iterable[tuple[int, str]]) -> int:
    """Insert secrets (workspace_id, name) in bulk through the model (its defaults apply)."""
    from sqlalchemy import insert

    from app.extensions import db
    from app.models import Secret

    rows = [{"workspace_id": ws, "name": name, "value": f"v-{name}"} for ws, name in pairs]
    with local_app(url):
        for start in range(0, len(rows), 5000):
            db.session.execute(insert(Secret), rows[start : start + 5000])
        db.session.commit()
    return len(rows)


# ---- the server --------------------------------------------------------------------------------


_LOG_DIR: list[Path] = []


def log_dir() -> Path:
    """A private directory for this run's server logs and profiles."""
    if not _LOG_DIR:
        _LOG_DIR.append(Path(tempfile.mkdtemp(prefix="countersign-perf-")))
    return _LOG_DIR[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn with gthread workers serving bench.wsgi:app on 127.0.0.1 (a fresh port)."""

    def __init__(
        self,
        url: str,
        *,
        workers: int = 2,
        threads: int = 16,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.database_url = url
        self.workers = workers
        self.threads = threads
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or log_dir() / f"gunicorn-{self.port}.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.postmaster = postmaster_pid(url)

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(self.workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(self.threads),
            "--timeout",
            "0",
            "--keep-alive",
            "10",
            "--backlog",
            "2048",
            "--bind",
            f"127.0.0.1:{self.port}",
            "bench.wsgi:app",
        ]

    def describe(self) -> str:
        return (
            f"gunicorn --workers {self.workers} --worker-class gthread --threads {self.threads}"
            " --timeout 0 --keep-alive 10 --backlog 2048 bench.wsgi:app"
        )

    def start(self, timeout: float = 60) -> Server:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "SECRET_KEY": SECRET_KEY,
            **SERVER_ENV,
            **self.extra_env,
        }
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log_path}")
            try:
                status, _ = Http(self.base_url).request("GET", "/bench/ping")
                if status == 401 and len(self.worker_pids()) == self.workers:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not come up; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
        self.log_file.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- HTTP --------------------------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection: use one per thread (cheaper than requests)."""

    IDLE_RECONNECT = 5.0  # below the server's --keep-alive, so it never closes under us

    def __init__(self, base_url: str, timeout: float = 60) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.last_used = 0.0
        self.reconnects = 0

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        if self.conn is not None and now - self.last_used > self.IDLE_RECONNECT:
            self.conn.close()
            self.conn = None
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self.conn, True
        return self.conn, False

    def warm(self) -> None:
        """Open (or refresh) the connection now, outside any timed section."""
        self._connection()
        self.last_used = time.monotonic()

    def request(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        sent = dict(headers or {})
        if token:
            sent["Authorization"] = f"Bearer {token}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn, fresh = self._connection()
            try:
                conn.request(method, path, body=payload, headers=sent)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection before reading the request:
                # nothing was processed, so sending it again once is safe.
                conn.close()
                self.conn = None
                self.reconnects += 1
                if fresh or attempt == 2:
                    raise
                continue
            self.last_used = time.monotonic()
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
                self.conn = None
            return response.status, data
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, token: str | None = None, body: Any = None):
        status, data = self.request(method, path, token, body)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, {"raw": data[:200].decode(errors="replace")}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class ThreadHttp(threading.local):
    """A per-thread Http to the same server."""

    def __init__(self, base_url: str) -> None:
        self.http = Http(base_url)


# ---- the API steps the benchmarks repeat --------------------------------------------------------


def secret_path(workspace_id: int, name: str) -> str:
    return f"/api/workspaces/{workspace_id}/secrets/{name}"


def request_approval(http: Http, world: World, workspace_id: int, name: str, agent="agent") -> int:
    """The agent's first DELETE: a 202 carrying the pending approval's id."""
    status, body = http.json("DELETE", secret_path(workspace_id, name), world.tokens[agent])
    if status != 202:
        raise RuntimeError(f"expected 202 for {name}, got {status}: {body}")
    return body["approval_id"]


def approve(http: Http, world: World, approval_id: int, human: str = "alice") -> None:
    status, body = http.json(
        "POST",
        f"/api/approvals/{approval_id}/decision",
        world.tokens[human],
        {"decision": "approve", "reason": "bench"},
    )
    if status != 200:
        raise RuntimeError(f"approve {approval_id}: {status} {body}")


def parallel(items: list[Any], work: Callable[[Http, Any], Any], base_url: str, threads=8) -> list:
    """Run work(http, item) over items on a few threads (setup, untimed); results in order."""
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    index = iter(range(len(items)))
    lock = threading.Lock()

    def run() -> None:
        http = Http(base_url)
        while True:
            with lock:
                i = next(index, None)
            if i is None or errors:
                break
            try:
                results[i] = work(http, items[i])
            except BaseException as error:
                errors.append(error)
        http.close()

    workers = [threading.Thread(target=run) for _ in range(min(threads, max(1, len(items))))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


# ---- measuring ---------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    values = sorted(latencies)
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p90_ms": round(percentile(values, 90) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "mean_ms": round(sum(values) / len(values) * 1000, 2) if values else float("nan"),
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Timed:
    """One timed run: wall time, per-request latencies, and statuses seen."""

    wall: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


def timed_run(
    base_url: str,
    items: list[Any],
    send: Callable[[Http, Any], int],
    concurrency: int,
) -> Timed:
    """Send every item once, ``concurrency`` at a time, on warm keep-alive connections."""
    lock = threading.Lock()
    index = iter(range(len(items)))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[BaseException] = []
    gate = threading.Barrier(concurrency + 1)
    done_at: list[float] = []

    def run() -> None:
        http = Http(base_url)
        http.warm()
        mine: list[float] = []
        seen: dict[int, int] = {}
        gate.wait()
        while True:
            with lock:
                i = next(index, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status = send(http, items[i])
            except BaseException as error:
                errors.append(error)
                break
            mine.append(time.perf_counter() - start)
            seen[status] = seen.get(status, 0) + 1
        end = time.perf_counter()
        with lock:
            latencies.extend(mine)
            for status, count in seen.items():
                statuses[status] = statuses.get(status, 0) + count
            done_at.append(end)
        http.close()

    workers = [threading.Thread(target=run) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    gate.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return Timed(max(done_at) - start, latencies, statuses)


# ---- the machine -------------------------------------------------------------------------------


def machine(url: str | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if url:
        with connect(url) as conn:
            info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
            info["postgresql_settings"] = {
                name: conn.execute(f"SHOW {name}").fetchone()[0]
                for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections")
            }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "app", "migrations"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["git"] = {"commit": commit or None, "app_modified_in_worktree": bool(dirty)}
    except OSError:
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def process_cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of processes (and their threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class CpuMeter:
    """CPU seconds spent from now on by the workers, our PostgreSQL, this process, the machine.

    PostgreSQL backends come and go, so each is measured from its first sighting (a backend that
    exits within the window is missed: the pool keeps them long-lived, so few do).
    """

    def __init__(self, server: Server) -> None:
        self.workers = server.worker_pids()
        self.postmaster = server.postmaster
        self.start = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "gunicorn_workers": process_cpu_seconds(self.workers),
            "load_generator": process_cpu_seconds([os.getpid()]),
            "postgresql": {
                pid: process_cpu_seconds([pid]) for pid in postgres_pids(self.postmaster)
            },
            "machine_busy": machine_busy_seconds(),
        }

    def read(self) -> dict[str, float]:
        end = self._snapshot()
        pg = sum(
            seconds - self.start["postgresql"].get(pid, 0.0)
            for pid, seconds in end["postgresql"].items()
        )
        spent = {
            "gunicorn_workers": round(end["gunicorn_workers"] - self.start["gunicorn_workers"], 2),
            "postgresql": round(pg, 2),
            "load_generator": round(end["load_generator"] - self.start["load_generator"], 2),
            "machine_busy": round(end["machine_busy"] - self.start["machine_busy"], 2),
        }
        # What the rest of the machine (other users of a shared box) took meanwhile.
        spent["other_processes"] = round(
            spent["machine_busy"]
            - spent["gunicorn_workers"]
            - spent["postgresql"]
            - spent["load_generator"],
            2,
        )
        return spent


class WaitSampler:
    """Samples what our database's client backends are doing (pg_stat_activity) every 50 ms.

    Shows where requests wait inside PostgreSQL: on a lock (which kind), on the client (idle in
    transaction: the Python side is working or waiting for the GIL), or running.
    """

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url, self.interval = url, interval
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with connect(self.url) as conn:
            while not self.stop.wait(self.interval):
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend' AND query NOT LIKE 'LISTEN%%'"
                ).fetchall()
                self.samples += 1
                for state, kind, event in rows:
                    if state == "idle":
                        continue
                    if state == "active" and kind is None:
                        label = "active: running"
                    elif state == "active":
                        label = f"active: waiting on {kind}:{event}"
                    else:
                        label = state  # idle in transaction: the client side holds it
                    self.counts[label] += 1

    def __enter__(self) -> WaitSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """Average number of backends in each state per sample (busy backends only)."""
        if not self.samples:
            return {}
        return {label: round(count / self.samples, 2) for label, count in self.counts.most_common()}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server process of ``url``'s cluster (the parent of our own backend)."""
    with connect(url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        try:
            for line in Path(f"/proc/{backend}/status").read_text().splitlines():
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        except OSError:
            return None
    return None


def postgres_pids(postmaster: int | None) -> list[int]:
    """The cluster's processes: the postmaster and its children (backends, writers)."""
    if postmaster is None:
        return []
    try:
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except OSError:
        return []
    return [postmaster, *(int(pid) for pid in children)]


def random_suffix() -> str:
    return secrets.token_hex(4)
