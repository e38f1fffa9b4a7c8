"""A small client for agents calling a Countersign-gated API (stdlib only; no Flask needed).

    client = CountersignClient("http://127.0.0.1:5000", token, on_progress=print)
    response = client.call("DELETE", "/api/workspaces/7")   # blocks while a human decides

On 202 the client long-polls the approval (honouring Retry-After), re-sends the identical
request once it is approved and returns that final response. A denial raises ApprovalDenied
with the human's reason; an expired or withdrawn request raises ApprovalExpired; running out
of patience raises ApprovalTimeout.
"""

from __future__ import annotations

import json as jsonlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApprovalDenied",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalTimeout",
    "CountersignClient",
    "Response",
]

LONG_POLL_CAP = 60


class ApprovalError(Exception):
    """Base class: the gated request did not get a usable approval."""

    def __init__(self, message: str, approval_id: int | None = None) -> None:
        super().__init__(message)
        self.approval_id = approval_id


class ApprovalDenied(ApprovalError):
    def __init__(self, reason: str | None, approval_id: int | None = None) -> None:
        super().__init__(f"denied by a human: {reason or 'no reason given'}", approval_id)
        self.reason = reason


class ApprovalExpired(ApprovalError):
    """The request expired or was withdrawn before it was approved and used."""


class ApprovalTimeout(ApprovalError):
    """Nobody decided within the client's max_wait."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        return jsonlib.loads(self.body) if self.body else None


class CountersignClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        max_wait: float = 3600,
        request_timeout: float = 30,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.max_wait = max_wait
        self.request_timeout = request_timeout
        self.on_progress = on_progress or (lambda message: None)

    # -- HTTP --------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """One plain HTTP request with the bearer token; never raises for HTTP error statuses."""
        data = None if json is None else jsonlib.dumps(json).encode()
        # Only http(s): the scheme of base_url is checked in __init__.
        req = urllib.request.Request(  # noqa: S310  # nosec B310
            self.base_url + path, data=data, method=method.upper()
        )
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            # The scheme was checked in __init__ (http or https only).
            opened = urllib.request.urlopen(  # noqa: S310  # nosec B310
                req, timeout=timeout or self.request_timeout
            )
            with opened as raw:
                return Response(raw.status, dict(raw.headers.items()), raw.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, dict(error.headers.items()), error.read())

    # -- the gated call ---------------------------------------------------------------------------

    def call(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request; if a human must approve it, wait, then re-send it once and return."""
        deadline = time.monotonic() + self.max_wait
        response = self.request(method, path, json, headers)
        while True:
            if response.status == 403 and _error(response) == "approval_denied":
                body = response.json()
                raise ApprovalDenied(body.get("reason"), body.get("approval_id"))
            if response.status != 202:
                return response
            pending = response.json()
            approval = self._wait_for_decision(pending, deadline, _retry_after(response))
            if approval["status"] == "denied":
                raise ApprovalDenied(approval.get("reason"), approval["id"])
            if approval["status"] != "approved":
                raise ApprovalExpired(
                    f"approval #{approval['id']} is {approval['status']}", approval["id"]
                )
            self.on_progress(f"approval #{approval['id']} granted; re-sending the request")
            response = self.request(method, path, json, headers)

    def _wait_for_decision(self, pending: dict, deadline: float, retry_after: float) -> dict:
        approval_id = pending["approval_id"]
        status_url = pending["status_url"]
        self.on_progress(f"waiting for approval #{approval_id}: {pending.get('summary', '')}")
        last_progress = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApprovalTimeout(
                    f"no decision on approval #{approval_id} within {self.max_wait:.0f}s",
                    approval_id,
                )
            wait = min(LONG_POLL_CAP, remaining)
            response = self.request(
                "GET", f"{status_url}?wait={wait:.0f}", timeout=wait + self.request_timeout
            )
            if response.status in (429, 502, 503, 504):
                time.sleep(min(_retry_after(response) or retry_after or 1, remaining))
                continue
            if response.status != 200:
                raise ApprovalError(
                    f"reading approval #{approval_id} failed: HTTP {response.status}", approval_id
                )
            approval = response.json()
            if approval["status"] != "pending":
                return approval
            progress = _progress(approval)
            if progress != last_progress:
                self.on_progress(progress)
                last_progress = progress


def _error(response: Response) -> str | None:
    try:
        return (response.json() or {}).get("error")
    except ValueError:
        return None


def _retry_after(response: Response) -> float:
    try:
        return float(response.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0


def _progress(approval: dict) -> str:
    message = f"waiting for approval #{approval['id']}"
    required = approval.get("approvals_required")
    if required and required > 1:
        message += f" ({approval.get('approvals_count', 0)} of {required})"
    return message
