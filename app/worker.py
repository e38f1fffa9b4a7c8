"""The periodic jobs behind `flask worker`: expire, escalate, deliver the outbox.

Each job runs in its own transaction(s) and claims its rows with FOR UPDATE SKIP LOCKED on
PostgreSQL (webhook messages also with a lease), so any number of workers may run at once: a
request is expired or escalated by one of them, a notification is claimed by one of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from . import approvals, outbox
from .extensions import db

log = logging.getLogger("countersign.worker")


@dataclass
class Report:
    """What one run did; the CLI prints the non-zero lines."""

    expired: int = 0
    stale: int = 0
    escalated: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0

    def lines(self) -> list[str]:
        texts = {
            "expired": "expired {} request(s)",
            "stale": "expired {} unused approval(s)",
            "escalated": "escalated {} request(s)",
            "delivered": "delivered {} notification(s)",
            "retrying": "{} notification(s) failed and will be retried",
            "dead": "{} notification(s) failed for the last time (dead letter)",
        }
        return [
            texts[f.name].format(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name)
        ]


def run_once(config: Any, worker: str, now: datetime | None = None) -> Report:
    """Run every job once, in order, committing each; deliveries last, so new events go out."""
    report = Report()
    report.expired = _job(approvals.expire_due, now)
    report.stale = _job(approvals.expire_stale_approvals, now)
    report.escalated = _job(approvals.escalate_due, now)
    counts = outbox.deliver_due(outbox.DeliverySettings.from_config(config), worker, now=now)
    report.delivered, report.retrying, report.dead = counts.delivered, counts.retrying, counts.dead
    return report


def _job(job, now: datetime | None) -> int:
    try:
        done = job(now)
        db.session.commit()
        return done
    except Exception:
        db.session.rollback()
        raise
    finally:
        db.session.remove()
