"""Publish/subscribe of approval changes, delivered only after the transaction commits.

One interface, two transports:
- SQLite (one process): the committing session hands its changes to the in-process hub.
- PostgreSQL: the transaction itself sends ``NOTIFY countersign_events`` (PostgreSQL delivers
  it on commit and drops it on rollback); a listener thread in every process LISTENs and feeds
  its local hub, so a change made by worker A reaches the dashboards connected to worker B.

Payloads carry ids only; subscribers read the rows they need. Delivery is best-effort: a
failing subscriber never breaks the gate, and dashboards resync on reconnect.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from flask import Flask, current_app, has_app_context
from sqlalchemy import event, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CHANNEL = "countersign_events"
_SESSION_KEY = "countersign_changes"


@dataclass(frozen=True)
class ApprovalChange:
    """An approval request changed state; ``kind`` is the event kind ("created", ...)."""

    approval_id: int
    event_id: int
    kind: str

    def encode(self) -> str:
        return f"{self.approval_id}:{self.event_id}:{self.kind}"

    @classmethod
    def decode(cls, payload: str) -> ApprovalChange:
        approval_id, event_id, kind = payload.split(":", 2)
        return cls(int(approval_id), int(event_id), kind)


# Sent to subscribers when the listener reconnected: they may have missed changes, so resync.
RESYNC = ApprovalChange(0, 0, "resync")


class Subscription:
    """A subscriber's private queue of changes."""

    def __init__(self, hub: EventHub, purpose: str) -> None:
        self._hub = hub
        self.purpose = purpose
        self._queue: queue.SimpleQueue[ApprovalChange] = queue.SimpleQueue()

    def put(self, change: ApprovalChange) -> None:
        self._queue.put(change)

    def get(self, timeout: float | None = None) -> ApprovalChange | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """In-process fan-out of changes to subscriptions; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._on_first_subscriber: list = []

    def subscribe(self, purpose: str = "dashboard") -> Subscription:
        """A new subscription; ``purpose`` labels it in metrics (dashboard, longpoll, ...)."""
        subscription = Subscription(self, purpose)
        with self._lock:
            self._subscriptions.add(subscription)
            starters, self._on_first_subscriber = self._on_first_subscriber, []
        for start in starters:
            start()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def subscriber_counts(self) -> dict[str, int]:
        with self._lock:
            purposes = [subscription.purpose for subscription in self._subscriptions]
        return {purpose: purposes.count(purpose) for purpose in set(purposes)}

    def dispatch(self, change: ApprovalChange) -> None:
        with self._lock:
            targets = list(self._subscriptions)
        for subscription in targets:
            subscription.put(change)

    def call_on_first_subscriber(self, start) -> None:
        with self._lock:
            self._on_first_subscriber.append(start)


def queue_change(session: Session, change: ApprovalChange) -> None:
    """Remember a change on the session; it is published when (and only if) it commits."""
    session.info.setdefault(_SESSION_KEY, []).append(change)


class Publisher:
    """Binds the hub to an app's transactions and, on PostgreSQL, to LISTEN/NOTIFY."""

    def __init__(self, app: Flask) -> None:
        self.hub = EventHub()
        url = app.config["SQLALCHEMY_DATABASE_URI"]
        self.uses_notify = url.startswith("postgresql") and app.config["COUNTERSIGN_PG_NOTIFY"]
        self._dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._listener: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._listening = threading.Event()
        self._stop = threading.Event()
        if self.uses_notify:
            self.hub.call_on_first_subscriber(self._start_listener)

    def before_commit(self, session: Session) -> None:
        changes = session.info.get(_SESSION_KEY)
        if changes and self.uses_notify:
            # NOTIFY is transactional: delivered on commit, dropped on rollback.
            payload = ",".join(change.encode() for change in changes)
            session.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": payload},
            )

    def after_commit(self, session: Session) -> None:
        changes = session.info.pop(_SESSION_KEY, None)
        if changes and not self.uses_notify:
            for change in changes:
                self.safe_dispatch(change)

    def safe_dispatch(self, change: ApprovalChange) -> None:
        try:
            self.hub.dispatch(change)
        except Exception:  # a subscriber must never break the committing request
            log.exception("event dispatch failed")

    # -- PostgreSQL listener ----------------------------------------------------------------------

    def _start_listener(self) -> None:
        with self._start_lock:  # the first subscriber and start_listening() may race
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen_forever, name="pg-listen", daemon=True
                )
                self._listener.start()

    def start_listening(self, timeout: float = 10) -> bool:
        """Start the listener now (not on first subscriber) and wait until it is LISTENing."""
        if not self.uses_notify:
            return True
        self._start_listener()
        return self._listening.wait(timeout)

    def _listen_forever(self) -> None:
        import psycopg

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    # Anything committed before LISTEN took effect was not heard: subscribers
                    # that were already waiting (first start or a reconnect) must re-read.
                    self.safe_dispatch(RESYNC)
                    backoff = 0.5
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            for part in notify.payload.split(","):
                                self.safe_dispatch(ApprovalChange.decode(part))
            except Exception:
                self._listening.clear()
                log.warning("event listener lost its connection; retrying in %.1fs", backoff)
                self._stop.wait(backoff)  # reconnect backoff, not synchronisation
                backoff = min(backoff * 2, 10)

    def stop(self) -> None:
        self._stop.set()


def _current_publisher() -> Publisher | None:
    return current_app.extensions.get("countersign_events") if has_app_context() else None


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    if (pub := _current_publisher()) is not None:
        pub.before_commit(session)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if (pub := _current_publisher()) is not None:
        pub.after_commit(session)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_SESSION_KEY, None)


def init_app(app: Flask) -> Publisher:
    publisher = Publisher(app)
    app.extensions["countersign_events"] = publisher
    return publisher


def publisher_of(app: Flask) -> Publisher:
    return app.extensions["countersign_events"]
