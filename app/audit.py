"""The approval event log as a hash chain: append, verify, export.

Each event stores ``hash = sha256(prev_hash + "\\n" + canonical content)`` and the hash of the
event before it, so editing a row's content breaks its own hash, and deleting, inserting or
reordering rows breaks the next row's link. The database refuses two events with the same
``prev_hash`` (a fork) through a unique constraint.

Appends are serialised: on PostgreSQL the appending transaction takes a transaction-scoped
advisory lock before it reads the chain's head, and holds it until it commits; SQLite allows one
writer at a time anyway. The head is cached on the session for the rest of the transaction, so a
transaction writing many events locks and reads once.

The chain proves the log was not altered *inside* what it covers: cutting events off its end
leaves a shorter, valid chain. Anchor the head elsewhere (``audit export`` prints it) to catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from .extensions import db
from .models import ApprovalEvent, utcnow
from .policy import canonical_json

GENESIS = "0" * 64
# pg_advisory_xact_lock key: any constant no other code uses ("CntrSign" as a 63-bit integer).
CHAIN_LOCK_KEY = 0x436E747253696E67
_HEAD_KEY = "countersign_audit_head"


def canonical_content(
    approval_id: int, kind: str, actor: str, detail: dict[str, Any], created_at: datetime
) -> str:
    """What an event's hash covers: everything in the row but its id and its own hashes."""
    return canonical_json(
        {
            "approval_id": approval_id,
            "kind": kind,
            "actor": actor,
            "detail": detail,
            "created_at": created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        }
    )


def event_hash(prev_hash: str, content: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


# ---- appending ---------------------------------------------------------------------------------


def append(approval_id: int, kind: str, actor: str, detail: dict[str, Any]) -> ApprovalEvent:
    """Add the next event of the chain to the current transaction (flushed, not committed)."""
    session = db.session()
    prev_hash = session.info.get(_HEAD_KEY)
    if prev_hash is None:
        prev_hash = _locked_head(session)
    created_at = utcnow()
    entry = ApprovalEvent(
        approval_id=approval_id,
        kind=kind,
        actor=actor,
        detail=detail,
        created_at=created_at,
        prev_hash=prev_hash,
        hash=event_hash(prev_hash, canonical_content(approval_id, kind, actor, detail, created_at)),
    )
    session.add(entry)
    session.flush()
    session.info[_HEAD_KEY] = entry.hash
    return entry


def _locked_head(session: Session) -> str:
    """Take the chain lock (PostgreSQL) and read the newest event's hash under it."""
    if session.get_bind().dialect.name == "postgresql":
        # A separate statement from the read below: under READ COMMITTED the read's snapshot is
        # taken after the lock is granted, so it sees the previous holder's committed event.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})
    head = session.execute(
        select(ApprovalEvent.hash).order_by(ApprovalEvent.id.desc()).limit(1)
    ).scalar_one_or_none()
    return head or GENESIS


@event.listens_for(Session, "after_transaction_end")
def _forget_head(session: Session, transaction) -> None:
    """The cached head (and the advisory lock) last only as long as the transaction."""
    session.info.pop(_HEAD_KEY, None)


# ---- verifying ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainStatus:
    """The result of walking the chain: intact, or the first broken link."""

    ok: bool
    events: int  # events checked
    head: str | None  # the last good hash (the whole chain's head when ok)
    broken_event_id: int | None = None
    problem: str | None = None

    @property
    def message(self) -> str:
        if self.ok:
            return f"audit chain intact: {self.events} event(s), head {self.head or GENESIS}"
        return f"audit chain broken at event {self.broken_event_id}: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


def verify_rows(rows: Iterable[Any]) -> ChainStatus:
    """Walk events (anything with the event's attributes) in id order; pure over the rows."""
    expected_prev, previous_id, count = GENESIS, None, 0
    for row in rows:
        if row.prev_hash != expected_prev:
            after = f"event {previous_id}" if previous_id is not None else "the chain's start"
            return ChainStatus(
                False,
                count,
                expected_prev,
                row.id,
                f"its prev_hash does not match the hash of {after} "
                "(an event before it was changed, removed or reordered)",
            )
        content = canonical_content(
            row.approval_id, row.kind, row.actor, row.detail, row.created_at
        )
        if event_hash(row.prev_hash, content) != row.hash:
            return ChainStatus(
                False, count, expected_prev, row.id, "its content does not match its hash (edited)"
            )
        expected_prev, previous_id, count = row.hash, row.id, count + 1
    return ChainStatus(True, count, expected_prev if count else None)


def verify(batch_size: int = 1000) -> ChainStatus:
    """Verify the whole chain in the database, reading it in batches."""
    return verify_rows(_all_events(batch_size))


_COLUMNS = (
    ApprovalEvent.id,
    ApprovalEvent.approval_id,
    ApprovalEvent.kind,
    ApprovalEvent.actor,
    ApprovalEvent.detail,
    ApprovalEvent.created_at,
    ApprovalEvent.prev_hash,
    ApprovalEvent.hash,
)


def _all_events(batch_size: int) -> Iterator[Any]:
    """Every event as a plain row, in id order (rows, not ORM objects: memory stays flat)."""
    after = 0
    while True:
        batch = list(
            db.session.execute(
                select(*_COLUMNS)
                .where(ApprovalEvent.id > after)
                .order_by(ApprovalEvent.id)
                .limit(batch_size)
            )
        )
        yield from batch
        if len(batch) < batch_size:
            return
        after = batch[-1].id


# ---- exporting ---------------------------------------------------------------------------------


def event_json(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "approval_id": entry.approval_id,
        "kind": entry.kind,
        "actor": entry.actor,
        "detail": entry.detail,
        "created_at": entry.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def export(out: IO[str], batch_size: int = 1000) -> int:
    """Write every event as one JSON line, oldest first; return how many were written."""
    count = 0
    for entry in _all_events(batch_size):
        out.write(json.dumps(event_json(entry), sort_keys=True, ensure_ascii=False) + "\n")
        count += 1
    return count
