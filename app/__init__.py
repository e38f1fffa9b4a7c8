"""Countersign: a human countersignature in front of destructive operations agents can trigger."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.routing import IntegerConverter

from . import events, logs, metrics, security
from .config import default_config, load_environment, normalise_database_url
from .extensions import csrf, db, migrate, sock
from .policy_file import load_policy


class IdConverter(IntegerConverter):
    """Positive ids that fit a 32-bit column; anything else is simply not a route (404)."""

    # 1 .. 2**31 - 1 without leading zeros, bounded by the regex itself: when only to_python
    # rejects a value, werkzeug answers 405 if another method's rule matched the path first.
    regex = (
        r"(?:[1-9]\d{0,8}|1\d{9}|20\d{8}|21[0-3]\d{7}|214[0-6]\d{6}|2147[0-3]\d{5}"
        r"|21474[0-7]\d{4}|214748[0-2]\d{3}|2147483[0-5]\d{2}|21474836[0-3]\d|214748364[0-7])"
    )

    def __init__(self, map, **kwargs: Any) -> None:
        super().__init__(map, min=1, max=2**31 - 1, **kwargs)


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: config layers, extensions, blueprints, error handlers, CLI."""
    app = Flask(
        __name__,
        instance_relative_config=True,
        template_folder="../templates",
        static_folder="../static",
    )
    app.config.from_mapping(default_config(app.instance_path))
    load_environment(app.config)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["SQLALCHEMY_DATABASE_URI"] = normalise_database_url(
        app.config["SQLALCHEMY_DATABASE_URI"]
    )
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite:///"):
        os.makedirs(app.instance_path, exist_ok=True)

    # An invalid policy file stops the app here, with the file, key and reason in the message.
    app.extensions["countersign_policy"] = load_policy(app.config["COUNTERSIGN_POLICY"])
    app.url_map.converters["id"] = IdConverter
    db.init_app(app)
    migrate.init_app(app, db, directory=os.path.join(os.path.dirname(app.root_path), "migrations"))
    sock.init_app(app)
    csrf.init_app(app)
    events.init_app(app)
    metrics.init_app(app)
    logs.init_app(app)

    from .api import bp as api_bp
    from .api.docs import bp as api_docs_bp
    from .cli import register_cli
    from .dashboard import bp as dashboard_bp
    from .errors import register_error_handlers

    csrf.exempt(api_bp)  # the API authenticates with bearer tokens, not cookies
    security.init_app(app)
    security.throttle_failed_auth(app, api_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(api_docs_bp)
    app.register_blueprint(dashboard_bp)
    register_error_handlers(app)
    register_cli(app)
    return app


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """SQLite enforces foreign keys (our cascades) only when asked, per connection."""
    if dbapi_connection.__class__.__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()
