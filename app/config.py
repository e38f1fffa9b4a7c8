"""Configuration defaults and the database URL normalisation."""

import json
import os
import secrets
from pathlib import Path


def normalise_database_url(url: str) -> str:
    """Point bare postgres URLs at the psycopg 3 driver, which is the one we ship."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def default_config(instance_path: str) -> dict:
    """Defaults, overridden by COUNTERSIGN_* / FLASK_* environment variables and test config."""
    sqlite_path = Path(instance_path) / "countersign.sqlite3"
    return {
        # A random key per process is safe for a demo but breaks sessions across workers:
        # production must set SECRET_KEY (the README says so).
        "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_hex(32),
        "SQLALCHEMY_DATABASE_URI": normalise_database_url(
            os.environ.get("DATABASE_URL") or f"sqlite:///{sqlite_path}"
        ),
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True},
        "MAX_CONTENT_LENGTH": 1024 * 1024,
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        "SOCK_SERVER_OPTIONS": {"ping_interval": 25},
        "WTF_CSRF_TIME_LIMIT": None,
        # Extra origins allowed to open the dashboard websocket (besides the page's own host).
        "COUNTERSIGN_ALLOWED_ORIGINS": [],
        # Seconds an agent is told to wait before retrying a pending request.
        "COUNTERSIGN_RETRY_AFTER": 5,
        # Use LISTEN/NOTIFY on PostgreSQL so every process sees every event.
        "COUNTERSIGN_PG_NOTIFY": True,
        # A TOML policy file that tunes the built-in map per action and subtree (policy_file.py).
        "COUNTERSIGN_POLICY": os.environ.get("COUNTERSIGN_POLICY") or None,
        # Webhook delivery (outbox.py): per-attempt timeout, tries before the dead letter,
        # backoff (doubling from BACKOFF seconds up to BACKOFF_CAP, with jitter), and the lease a
        # worker holds on a message while posting it. 12 tries span 1.7 to 3.4 hours (jitter).
        "COUNTERSIGN_WEBHOOK_TIMEOUT": 5.0,
        "COUNTERSIGN_WEBHOOK_MAX_ATTEMPTS": 12,
        "COUNTERSIGN_WEBHOOK_BACKOFF": 10.0,
        "COUNTERSIGN_WEBHOOK_BACKOFF_CAP": 3600.0,
        "COUNTERSIGN_WEBHOOK_LEASE": 60.0,
        # Prefix for links in notifications, e.g. https://countersign.example.com (else paths).
        "COUNTERSIGN_PUBLIC_URL": os.environ.get("COUNTERSIGN_PUBLIC_URL") or "",
    }


def load_environment(config: dict) -> None:
    """COUNTERSIGN_* variables set the config keys of the same name; FLASK_* set Flask's own.

    Values are parsed as JSON when they parse (numbers, true/false, lists), else kept as text.
    """
    for name, raw in os.environ.items():
        if name.startswith("FLASK_") and name not in ("FLASK_APP", "FLASK_DEBUG", "FLASK_ENV"):
            key = name.removeprefix("FLASK_")
        elif name.startswith("COUNTERSIGN_") and name not in ("COUNTERSIGN_TEST_ENGINE",):
            key = name
        else:
            continue
        try:
            config[key] = json.loads(raw)
        except ValueError:
            config[key] = raw
