"""Configuration defaults and the database URL normalisation."""

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
    }
