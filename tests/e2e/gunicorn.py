"""Run the real app under gunicorn (gthread workers) in a subprocess, for tests and benches."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Gunicorn:
    """`gunicorn wsgi:app --worker-class gthread` on a free port; ready once a worker booted.

    The listening socket is bound by the master before any worker boots, so requests sent
    after that line simply wait in the backlog until the worker accepts them.
    """

    def __init__(
        self,
        database_url: str,
        *,
        threads: int = 8,
        workers: int = 1,
        secret_key: str = "test-secret-key",  # noqa: S107  (the tests' key)
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "gunicorn", "wsgi:app",
            "--bind", f"127.0.0.1:{self.port}",
            "--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
            "--timeout", "0", "--graceful-timeout", "2", "--log-level", "info",
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "SECRET_KEY": secret_key,
            **(env or {}),
        }
        self.workers = workers
        self.log: list[str] = []
        self._booted = threading.Semaphore(0)
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Gunicorn:
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        for _ in range(self.workers):
            if not self._booted.acquire(timeout=30):
                self.__exit__()
                raise RuntimeError("gunicorn did not boot:\n" + "".join(self.log[-40:]))
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if "Booting worker" in line:
                self._booted.release()
        for _ in range(self.workers):  # exited: wake anyone still waiting
            self._booted.release()

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # quick shutdown: sockets are long-lived
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._drainer.join(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
