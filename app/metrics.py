"""Prometheus metrics: gate outcomes, pending requests, decision latency, live subscribers.

Each app gets its own registry (tests build many apps in one process). Counters and histograms
are per process: under gunicorn, scrape each worker or read the gauges, which come from the
database and the process's hub at scrape time.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, g, has_app_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from .errors import ApiError
from .extensions import db

GATE_OUTCOMES = ("pending", "consumed", "rolled_back", "denied", "passthrough", "failed_closed")


class Metrics:
    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.gate_outcomes = Counter(
            "countersign_gate_outcomes",
            "Gate decisions by action and outcome",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "countersign_decision_seconds",
            "Time from a request's creation to its human decision",
            ["action", "decision"],
            buckets=(1, 5, 15, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(app))


class _StateCollector:
    """Gauges read at scrape time: pending requests by action, live subscribers, outbox backlog."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def describe(self):
        return []

    def collect(self):
        from .approvals import PENDING
        from .events import publisher_of
        from .models import ApprovalRequest, utcnow

        pending = GaugeMetricFamily(
            "countersign_pending_requests", "Pending approval requests by action", labels=["action"]
        )
        rows = db.session.execute(
            select(ApprovalRequest.action, func.count())
            .where(ApprovalRequest.status == PENDING, ApprovalRequest.expires_at > utcnow())
            .group_by(ApprovalRequest.action)
        )
        for action, count in rows:
            pending.add_metric([action], count)
        yield pending
        live = GaugeMetricFamily(
            "countersign_live_subscribers",
            "Connected live clients in this process (dashboard websockets, long-poll waiters)",
            labels=["purpose"],
        )
        for purpose, count in publisher_of(self.app).hub.subscriber_counts().items():
            live.add_metric([purpose], count)
        yield live
        yield from _outbox_backlog()


def _outbox_backlog():
    """Notifications still owed (dead letters are not backlog: nobody will retry them)."""
    from .models import OutboxMessage, OutboxStatus

    backlog = GaugeMetricFamily("countersign_outbox_backlog", "Notifications not yet delivered")
    owed = select(func.count()).where(OutboxMessage.status == OutboxStatus.PENDING.value)
    backlog.add_metric([], db.session.scalar(owed) or 0)
    return [backlog]


def init_app(app: Flask) -> None:
    app.extensions["countersign_metrics"] = Metrics(app)
    app.add_url_rule("/metrics", "metrics", metrics_view)


def current() -> Metrics:
    return current_app.extensions["countersign_metrics"]


def record_gate(action: str, outcome: str) -> None:
    current().gate_outcomes.labels(action=action, outcome=outcome).inc()


def observe_decision(action: str, decision: str, seconds: float) -> None:
    """Time from a request's creation to its final human decision (outside a request: no-op)."""
    if has_app_context():
        current().decision_seconds.labels(action=action, decision=decision).observe(seconds)


def metrics_view() -> Response:
    """Prometheus text format; needs a service token unless COUNTERSIGN_METRICS_PUBLIC is set."""
    if not current_app.config.get("COUNTERSIGN_METRICS_PUBLIC"):
        from .auth import caller_from_bearer

        caller = caller_from_bearer(request.headers.get("Authorization"))
        if caller.kind != "service":
            raise ApiError(403, "forbidden", "metrics need a service token")
        g.caller = caller
    return Response(generate_latest(current().registry), mimetype=CONTENT_TYPE_LATEST)
