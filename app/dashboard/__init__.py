"""The approval dashboard blueprint: server-rendered pages, htmx fragments, the websocket.

Modules: access.py (session login and the websocket's origin check), rows.py (what a user sees
of a request, shared by pages and the live feed), views.py (pages, login/logout, the decision
POST), live.py (the hub subscription behind each websocket), admin.py (the audit page and a
workspace's webhook delivery log).
"""

from flask import Blueprint

bp = Blueprint("dashboard", __name__)

from . import access, admin, filters, live, views  # noqa: E402, F401  (hooks and routes)
