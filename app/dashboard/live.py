"""Live updates: one websocket per dashboard page, fed by the process's event hub.

Each socket owns a Feed: the pending rows its page holds, for its user. A change from the hub
is checked against the user's roles on the request's scope (the rule of approvals.visible_to)
before anything is rendered, so a user only ever receives requests they may see. Messages are
server-rendered fragments with hx-swap-oob, applied by htmx's ws extension.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from flask import current_app, render_template, request
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from .. import approvals, events
from ..auth import Caller
from ..extensions import db, sock
from ..models import ApprovalRequest, utcnow
from . import bp
from .access import current_caller
from .rows import Entry, Snapshot, entry_for, pending_entries, snapshot
from .views import detail_context

log = logging.getLogger(__name__)

# How often an idle socket handler wakes to notice that its client went away.
IDLE_POLL_SECONDS = 1.0
# Changes handled per message when they arrive in a burst.
MAX_BATCH = 200


class SnapshotCache:
    """Snapshots keyed by (approval id, event id), loaded once per process per event.

    Hundreds of sockets wake for the same change; the first loads the row, the others wait for
    it instead of each querying it. Only the row is shared: whether a user may see it is still
    checked per socket.
    """

    def __init__(self, size: int = 512) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()

    def get(self, key: tuple[int, int], load: Callable[[], Snapshot | None]) -> Snapshot | None:
        with self._lock:
            slot = self._slots.get(key)
            owner = slot is None
            if owner:
                slot = self._slots[key] = _Slot()
                while len(self._slots) > self._size:
                    self._slots.popitem(last=False)
        if owner:
            try:
                slot.value = load()
            except BaseException:
                with self._lock:
                    self._slots.pop(key, None)
                raise
            finally:
                slot.ready.set()
            return slot.value
        if slot.ready.wait(timeout=10) and slot.loaded:
            return slot.value
        return load()  # the loader failed or stalled: read it ourselves

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)


class _Slot:
    __slots__ = ("_value", "loaded", "ready")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.loaded = False
        self._value: Snapshot | None = None

    @property
    def value(self) -> Snapshot | None:
        return self._value

    @value.setter
    def value(self, value: Snapshot | None) -> None:
        self._value = value
        self.loaded = True


class OpenSockets:
    """How many dashboard sockets this process holds open; lets a caller wait for none.

    A handler thread can outlive its server (werkzeug's are daemon threads), so whoever
    disposes the database engine first waits here until every handler has let go of it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._changed:
            self._open += 1
        try:
            yield
        finally:
            with self._changed:
                self._open -= 1
                self._changed.notify_all()

    @property
    def count(self) -> int:
        with self._changed:
            return self._open

    def wait_closed(self, timeout: float | None = None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._open == 0, timeout)


def open_sockets(app) -> OpenSockets:
    """The app's socket counter (one per process; dict.setdefault is atomic)."""
    return app.extensions.setdefault("countersign_live_sockets", OpenSockets())


def shared_cache() -> SnapshotCache:
    """The app's snapshot cache (one per process; dict.setdefault is atomic)."""
    return current_app.extensions.setdefault("countersign_live_cache", SnapshotCache())


@dataclass(frozen=True)
class LiveView:
    """Which page a socket serves: it decides which fragments the page can take."""

    page: str = "other"  # pending | detail | other
    approval_id: int | None = None

    @classmethod
    def from_args(cls, args) -> LiveView:
        page = args.get("view", "other")
        if page == "detail":
            approval_id = args.get("approval", type=int)
            if approval_id and approval_id > 0:
                return cls("detail", approval_id)
        return cls("pending" if page == "pending" else "other")


class Feed:
    """One socket's state (the pending rows its page shows) and the fragments that move it on.

    Not thread-safe on purpose: only its socket's handler thread uses it.
    """

    def __init__(self, caller: Caller, view: LiveView, cache: SnapshotCache | None = None) -> None:
        self.caller = caller
        self.view = view
        self.cache = cache if cache is not None else SnapshotCache()
        self.shown: dict[int, Entry] = {}

    @property
    def count(self) -> int:
        """Pending requests awaiting this user's decision."""
        return sum(1 for entry in self.shown.values() if entry.level is not None)

    def resync(self, now: datetime) -> str:
        """Everything the page shows, from scratch: on (re)connect and on a "resync" change."""
        entries = pending_entries(self.caller, now)
        self.shown = {entry.row.id: entry for entry in entries}
        parts = [self._count()]
        if self.view.page == "pending":
            parts.append(
                render_template("dashboard/_pending_list.html", entries=entries, oob=True, now=now)
            )
        if self.view.page == "detail":
            parts.append(self._detail(self.view.approval_id, now))
        return "".join(parts)

    def apply(self, changes: list[events.ApprovalChange], now: datetime) -> str:
        """The fragments for a batch of changes (empty when none concerns this user)."""
        if any(change.kind == events.RESYNC.kind for change in changes):
            return self.resync(now)
        before = self.count
        parts: list[str] = []
        for change in changes:
            parts.extend(self._apply_one(change, now))
        parts.extend(self.expire_due(now, count=False))
        if self.count != before:
            parts.append(self._count())
        return "".join(parts)

    def expire_due(self, now: datetime, count: bool = True) -> list[str]:
        """Rows whose deadline passed leave the page even before the worker marks them."""
        due = [i for i, entry in self.shown.items() if entry.row.expires_at <= now]
        parts: list[str] = []
        for approval_id in due:
            entry = self.shown.pop(approval_id)
            parts.extend(self._leave(entry, entry.row, status=approvals.EXPIRED))
        if due and count:
            parts.append(self._count())
        return parts

    def seconds_to_next_deadline(self, now: datetime) -> float | None:
        if not self.shown:
            return None
        soonest = min(entry.row.expires_at for entry in self.shown.values())
        return max((soonest - now).total_seconds(), 0.0)

    # -- one change ---------------------------------------------------------------------------

    def _apply_one(self, change: events.ApprovalChange, now: datetime) -> list[str]:
        approval_id = change.approval_id
        row = self.cache.get((approval_id, change.event_id), lambda: snapshot(approval_id, now))
        # The per-user check, on every change: no role on the request's scope, nothing sent.
        entry = entry_for(self.caller, row) if row is not None else None
        parts: list[str] = []
        if entry is not None and entry.row.is_pending:
            if self.view.page == "pending":
                if approval_id in self.shown:
                    parts.append(self._row(entry, now, oob="true"))
                else:
                    parts.append(self._row(entry, now, oob="afterbegin:#pending-rows"))
            self.shown[approval_id] = entry
        elif approval_id in self.shown:
            shown = self.shown.pop(approval_id)
            # Out of sight (no longer visible): the row goes, without a word about why.
            parts.extend(self._leave(shown, entry.row if entry is not None else None))
        if (
            entry is not None
            and self.view.page == "detail"
            and self.view.approval_id == approval_id
        ):
            parts.append(self._detail(approval_id, now))
        return parts

    def _leave(self, shown: Entry, row: Snapshot | None, status: str | None = None) -> list[str]:
        """A row leaves the pending list; a notice says why, unless this user decided it."""
        parts = []
        if self.view.page == "pending":
            parts.append(f'<div id="approval-{shown.row.id}" hx-swap-oob="delete"></div>')
        if row is not None and row.decided_by_name != self.caller.name:
            parts.append(
                render_template("dashboard/_notice.html", row=row, status=status or row.status)
            )
        return parts

    # -- rendering ----------------------------------------------------------------------------

    def _count(self) -> str:
        return render_template("dashboard/_pending_count.html", count=self.count, oob=True)

    def _row(self, entry: Entry, now: datetime, oob: str) -> str:
        return render_template("dashboard/_row_oob.html", entry=entry, oob=oob, now=now)

    def _detail(self, approval_id: int | None, now: datetime) -> str:
        found = db.session.execute(
            select(ApprovalRequest).where(
                ApprovalRequest.id == approval_id, approvals.visible_to(self.caller)
            )
        ).scalar_one_or_none()
        if found is None:
            return ""
        return render_template(
            "dashboard/_approval_detail.html",
            **detail_context(found, now, self.caller),
            oob=True,
        )


def _drain(subscription: events.Subscription, first: events.ApprovalChange):
    batch = [first]
    while len(batch) < MAX_BATCH and (more := subscription.get(timeout=0)) is not None:
        batch.append(more)
    return batch


@sock.route("/ws", bp=bp)
def live(ws):
    """Push this user's changes as OOB fragments; the full pending list on every (re)connect."""
    with open_sockets(current_app).track():
        _serve(ws)


def _serve(ws) -> None:
    publisher = events.publisher_of(current_app)
    feed = Feed(current_caller(), LiveView.from_args(request.args), shared_cache())
    with publisher.hub.subscribe() as subscription:
        # On PostgreSQL, LISTEN before reading the snapshot so no change falls in between.
        publisher.start_listening()
        try:
            ws.send(feed.resync(utcnow()))
        finally:
            db.session.remove()  # don't pin a pooled connection while idle
        while ws.connected:
            while ws.receive(timeout=0) is not None:
                pass  # the page never talks; drop anything a client sends
            now = utcnow()
            deadline = feed.seconds_to_next_deadline(now)
            wait = IDLE_POLL_SECONDS if deadline is None else min(deadline, IDLE_POLL_SECONDS)
            change = subscription.get(timeout=wait)
            if not ws.connected:
                return  # the page left while we waited: nothing to render for it
            now = utcnow()
            try:
                if change is None:
                    message = "".join(feed.expire_due(now))
                else:
                    message = feed.apply(_drain(subscription, change), now)
            except SQLAlchemyError:
                log.warning("live feed lost the database; closing so the page reconnects")
                ws.close(reason=1011, message="database unavailable")
                return
            finally:
                db.session.remove()
            if message:
                ws.send(message)
