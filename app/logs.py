"""Structured JSON logs with a request id; never a token or a secret value."""

from __future__ import annotations

import logging
import re
import sys
import uuid

from flask import Flask, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners and daemons swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class RequestIdFilter(logging.Filter):
    """Stamp each record with the current request's id, so one request's lines can be joined."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = g.get("request_id") if has_request_context() else None
        return True


def init_app(app: Flask) -> None:
    logger = logging.getLogger("countersign")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(
            JsonFormatter("{asctime}{levelname}{name}{message}", style="{", timestamp=False)
        )
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)
        logger.setLevel(app.config.get("COUNTERSIGN_LOG_LEVEL", "INFO"))
        logger.propagate = False

    @app.before_request
    def assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex

    @app.after_request
    def echo_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response
