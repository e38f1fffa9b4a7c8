"""Helpers shared by the dashboard tests: log in over HTTP, open a real websocket."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import requests
from simple_websocket import Client
from simple_websocket.errors import ConnectionError as WsRefused  # noqa: F401  (re-exported)

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright never downloads a browser here
# Headless as root, on a machine whose network reaches nothing but the package registries.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
APPROVAL_ID = re.compile(r'id="approval-(\d+)"')


def csrf_from(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login_client(client, username: str, password: str):
    """Log a Flask test client in through the form (CSRF included); return the response."""
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )


def login_session(base_url: str, username: str, password: str) -> requests.Session:
    """A requests session logged in to a running server."""
    http = requests.Session()
    token = csrf_from(http.get(f"{base_url}/login", timeout=10).text)
    response = http.post(
        f"{base_url}/login",
        data={"username": username, "password": password, "csrf_token": token},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 303, response.text
    return http


def cookie_header(http: requests.Session) -> str:
    return "; ".join(f"{c.name}={c.value}" for c in http.cookies)


class WsClient(Client):
    """simple_websocket's client, sending Host with its port (as browsers do) and closing its
    socket when the server refuses the handshake."""

    def handshake(self) -> None:
        if self.port not in (80, 443):
            self.host = f"{self.host}:{self.port}"
        try:
            super().handshake()
        except BaseException:
            self.sock.close()
            raise


def ws_url(base_url: str, query: str = "view=pending") -> str:
    return base_url.replace("http://", "ws://", 1) + "/ws?" + query


def open_ws(
    base_url: str,
    http: requests.Session | None,
    *,
    origin: str | None = "same",
    query: str = "view=pending",
) -> Client:
    """A real websocket client; origin="same" sends the server's own origin."""
    headers: dict[str, Any] = {}
    if http is not None:
        headers["Cookie"] = cookie_header(http)
    if origin == "same":
        headers["Origin"] = base_url
    elif origin:
        headers["Origin"] = origin
    return WsClient(ws_url(base_url, query), headers=headers)


def receive_until(ws: Client, wanted: Callable[[str], bool], timeout: float = 10) -> list[str]:
    """Messages received up to and including the first one ``wanted`` accepts."""
    seen: list[str] = []
    while True:
        message = ws.receive(timeout=timeout)
        assert message is not None, f"no wanted message within {timeout}s; got {seen}"
        seen.append(message)
        if wanted(message):
            return seen


def agent_delete_secret(base_url: str, token: str, workspace_id: int, name: str):
    return requests.delete(
        f"{base_url}/api/workspaces/{workspace_id}/secrets/{name}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
