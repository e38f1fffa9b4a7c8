"""Count and list the SQL statements one request issues, in-process (Flask test client).

A ``before_cursor_execute`` hook records every statement with the app function that issued it
and the request phase it belongs to:

- auth: the bearer-token lookup (``caller_from_bearer``);
- describe: the route's own lookups of its target (``describe_*``: tree, rights, the secret);
- gate: the gate's decision and its bookkeeping (gate, approvals, audit, outbox, events);
- operation: the view doing the work (the delete itself).

Commits and pool pre-ping round trips are counted too: neither goes through the cursor hook.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from bench.harness import ROOT

APP_DIR = str(ROOT / "app") + "/"
GATE_MODULES = {"gate", "approvals", "audit", "outbox", "events", "policy", "metrics", "logs"}
DML = re.compile(r"(INSERT INTO|UPDATE|DELETE FROM) ")
GATE_TABLES = re.compile(r"\b(approval_\w+|outbox_\w+|webhooks?\w*)\b")


@dataclass
class Statement:
    phase: str
    where: str
    sql: str
    parameters: Any = None

    def to_json(self) -> dict[str, str]:
        return {"phase": self.phase, "where": self.where, "sql": self.sql}


@dataclass
class Recorder:
    statements: list[Statement] = field(default_factory=list)
    commits: int = 0
    pings: int = 0
    active: bool = False

    def reset(self) -> None:
        self.statements, self.commits, self.pings = [], 0, 0


def _origin() -> tuple[str, str]:
    """(phase, where) of the statement being executed, from the Python stack."""
    frames: list[tuple[str, str]] = []
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(APP_DIR):
            module = filename[len(APP_DIR) :].removesuffix(".py").replace("/", ".")
            frames.append((module, frame.f_code.co_name))
        frame = frame.f_back
    if not frames:
        return "other", "?"
    names = {name for _, name in frames}
    module, function = frames[0]
    where = f"{module}.{function}"
    if "caller_from_bearer" in names:
        return "auth", where
    if any(name.startswith("describe") for name in names):
        return "describe", where
    if module.split(".")[-1] in GATE_MODULES:
        return "gate", where
    return "operation", where


def _compact(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


@contextmanager
def recording(engine) -> Any:
    """Attach the hooks to ``engine`` for the duration; yields the Recorder."""
    recorder = Recorder()

    def before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
        if not recorder.active:
            return
        phase, where = _origin()
        sql = _compact(statement)
        if phase in ("gate", "operation") and DML.match(sql):
            # A flush runs wherever the session happens to flush (often the commit's
            # before_commit hooks): the table written says whose work it is.
            phase = "gate" if GATE_TABLES.search(sql.split(" WHERE ")[0]) else "operation"
        recorder.statements.append(Statement(phase, where, sql, parameters))

    def commit(conn):
        if recorder.active:
            recorder.commits += 1

    dialect = engine.dialect
    original_ping = dialect.do_ping

    def counting_ping(dbapi_connection):
        if recorder.active:
            recorder.pings += 1
        return original_ping(dbapi_connection)

    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    event.listen(engine, "commit", commit)
    dialect.do_ping = counting_ping
    try:
        yield recorder
    finally:
        event.remove(engine, "before_cursor_execute", before_cursor_execute)
        event.remove(engine, "commit", commit)
        dialect.do_ping = original_ping


def summarise(recorder: Recorder, status: int, sql_chars: int = 240) -> dict[str, Any]:
    phases = Counter(statement.phase for statement in recorder.statements)
    return {
        "status": status,
        "statements": len(recorder.statements),
        "by_phase": {phase: phases.get(phase, 0) for phase in PHASES if phases.get(phase)},
        "beyond_auth": len(recorder.statements) - phases.get("auth", 0),
        "gate_statements": phases.get("gate", 0),
        "commits": recorder.commits,
        "pool_pre_pings": recorder.pings,
        "list": [
            {**s.to_json(), "sql": s.sql[:sql_chars] + ("…" if len(s.sql) > sql_chars else "")}
            for s in recorder.statements
        ],
    }


PHASES = ("auth", "describe", "gate", "operation", "other")
