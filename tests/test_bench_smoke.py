"""The benchmark scripts still work: a short soak and a few race trials, on PostgreSQL.

They run as CI would run them by hand (subprocesses, gunicorn on loopback), against the
session's migrated test database, which they empty like any test does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import engine_name

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.postgres_only,
    pytest.mark.skipif(engine_name() != "postgresql", reason="the benchmarks need PostgreSQL"),
]


def bench(migrated: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": migrated},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_soak_keeps_its_invariants(migrated, tmp_path):
    summary = tmp_path / "soak.json"
    done = bench(
        migrated,
        "bench.soak",
        "--seconds",
        "8",
        "--rate",
        "40",
        "--dashboards",
        "2",
        "--json",
        str(summary),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["ok"] and result["violation_count"] == 0
    assert result["secrets_deleted"] == result["agent_204s"] > 0
    assert not [answer for answer in result["answers"] if answer.split()[-1].startswith("5")]


def test_race_executes_exactly_once(migrated):
    done = bench(migrated, "bench.race", "--trials", "4", "--concurrency", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["executions_histogram"] == {"0": 0, "1": 4, "2+": 0}
    assert result["server_errors_5xx"] == 0
