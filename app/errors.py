"""One JSON error shape for the API; HTML error pages elsewhere."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

from .extensions import db

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised anywhere under /api; rendered as {"error": code, "message": ..., **extra}."""

    # Positional-only, so an extra field may itself be called "status" (e.g. a 409's state).
    def __init__(self, status: int, code: str, message: str, /, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(status: int, code: str, message: str, /, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status


def _wants_json() -> bool:
    return request.path.startswith("/api") or request.accept_mimetypes.best == "application/json"


def _safe_rollback() -> None:
    try:
        db.session.rollback()
    except SQLAlchemyError:  # the connection may be gone: nothing more to undo
        log.warning("rollback failed", exc_info=True)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError):
        _safe_rollback()
        return error_response(error.status, error.code, error.message, **error.extra)

    @app.errorhandler(HTTPException)
    def handle_http_error(error: HTTPException):
        if not _wants_json():
            return render_template("error.html", error=error), error.code or 500
        code = (error.name or "error").lower().replace(" ", "_")
        response, status = error_response(error.code or 500, code, error.description or error.name)
        for name, value in error.get_headers():  # e.g. Allow on 405, as RFC 9110 requires
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(DBAPIError)
    def handle_database_down(error: DBAPIError):
        # Connection-level trouble: fail closed with a retryable status.
        _safe_rollback()
        log.error("database error: %s", error.__class__.__name__)
        if error.connection_invalidated or _is_operational(error):
            return _unavailable(error)
        if isinstance(error, DataError) and _wants_json():
            # A value the database cannot store (a NUL in PostgreSQL text): the client's input.
            return error_response(
                400, "bad_request", "the request carries a value the database cannot store"
            )
        return _internal()

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception):
        if isinstance(error, HTTPException):
            return handle_http_error(error)
        _safe_rollback()
        log.exception("unhandled error")
        return _internal()


# SQLSTATE classes that mean "the database cannot take writes right now", not "bad request":
# 08 connection, 25 invalid transaction state (read-only), 53 insufficient resources (disk
# full), 57 operator intervention (shutdown, restart).
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "25", "53", "57")


def _is_operational(error: DBAPIError) -> bool:
    """The database is down, read-only or full: fail closed with a retryable 503."""
    if isinstance(error, OperationalError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    return sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES


SQLSTATE_MESSAGES = {
    "25006": "the database is read-only",
    "53100": "the database is out of disk space",
    "57P01": "the database is shutting down",
    "57P03": "the database is starting up",
}


def describe_database_error(error: BaseException) -> str:
    """A short, safe explanation of why the database refused (never the SQL or parameters)."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None) or ""
    return SQLSTATE_MESSAGES.get(sqlstate, "the database is unavailable")


def _unavailable(error: BaseException | None = None):
    if _wants_json():
        reason = describe_database_error(error) if error else "the database is unavailable"
        return error_response(503, "unavailable", f"{reason}; nothing was done")
    return render_template("error.html", error=None, message="Service unavailable"), 503


def _internal():
    if _wants_json():
        return error_response(500, "internal_error", "unexpected error; nothing was committed")
    return render_template("error.html", error=None, message="Internal error"), 500
