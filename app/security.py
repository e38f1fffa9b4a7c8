"""Security headers on every response, and throttling of failed authentication.

Throttling uses Flask-Limiter with in-memory counters per process: under several gunicorn
workers each keeps its own count (point COUNTERSIGN_RATELIMIT_STORAGE_URI at a shared store,
e.g. redis://, to pool them).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from flask_limiter import HeaderNames, Limiter, RequestLimit
from flask_limiter.util import get_remote_address

log = logging.getLogger("countersign.security")

LIMITER_RETRY_AFTER = "X-RateLimit-Retry-After"

# Scripts and styles only from our own origin: every script is a vendored or own static file.
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; "
    "frame-ancestors 'none'"
)
# The vendored Swagger UI sets inline styles on its own elements.
DOCS_CSP = STRICT_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


def failed_authentication(response: Response) -> bool:
    return response.status_code == 401


def _log_breach(limit: RequestLimit) -> None:
    log.warning(
        "throttled",
        extra={"path": request.path, "remote_addr": request.remote_addr, "limit": str(limit.limit)},
    )


def init_app(app: Flask) -> Limiter:
    app.config.setdefault("COUNTERSIGN_AUTH_FAILURE_LIMIT", "20/minute")
    app.config.setdefault("COUNTERSIGN_LOGIN_LIMIT", "10/minute")

    # Flask-Limiter sets Retry-After on every response it counted, which would overwrite the
    # gate's hint on a 202 (rounded down: 1s became 0, a busy loop). Its value goes under its own
    # name, and becomes Retry-After only on its own 429s. Registered before the limiter's hook,
    # this one runs after it.
    @app.after_request
    def retry_after_on_throttle(response: Response) -> Response:
        if response.status_code == 429 and LIMITER_RETRY_AFTER in response.headers:
            response.headers["Retry-After"] = response.headers[LIMITER_RETRY_AFTER]
        return response

    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=app.config.get("COUNTERSIGN_RATELIMIT_STORAGE_URI", "memory://"),
        headers_enabled=True,
        header_name_mapping={HeaderNames.RETRY_AFTER: LIMITER_RETRY_AFTER},
        on_breach=_log_breach,
    )
    app.extensions["countersign_limiter"] = limiter

    @app.after_request
    def security_headers(response: Response) -> Response:
        csp = DOCS_CSP if request.path == "/api/docs" else STRICT_CSP
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    return limiter


def throttle_failed_auth(app: Flask, blueprint) -> None:
    """Count only 401s per client address: token spraying slows down, valid callers don't pay."""
    limiter: Limiter = app.extensions["countersign_limiter"]
    limiter.limit(
        lambda: app.config["COUNTERSIGN_AUTH_FAILURE_LIMIT"],
        deduct_when=failed_authentication,
        scope="api-auth-failures",
    )(blueprint)
