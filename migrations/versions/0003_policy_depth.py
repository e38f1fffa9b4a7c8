"""policy depth: N-of-M votes, escalation, webhook outbox, hash-chained event log

Revision ID: 0003
Revises: 0002

Reviewed by hand:
- approval_requests gains the policy it was created under (policy_version, policy_terms,
  approvals_required) and escalation state (escalation_level, escalate_at); the partial index
  ix_approval_requests_escalate_at carries both postgresql_where and sqlite_where.
- approval_events gains prev_hash/hash. Existing rows are chained here, in id order, with the
  same canonical form as app/audit.py (inlined: a migration must not change when the app does),
  then the columns become NOT NULL and uq_approval_events_prev_hash forbids forks.
- approval_votes (one row per human decision; uq_approval_votes_approver is partial on
  decision = 'approve'), webhooks, outbox_messages (ix_outbox_messages_due is partial on
  status = 'pending'), outbox_attempts.
"""

import hashlib
import json
from datetime import UTC

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

GENESIS = "0" * 64
PENDING_ESCALATION = sa.text("status = 'pending' AND escalate_at IS NOT NULL")
APPROVE_VOTE = sa.text("decision = 'approve'")
PENDING_MESSAGE = sa.text("status = 'pending'")


def upgrade():
    # Never recreate approval_requests on SQLite: dropping the old table would cascade-delete
    # its events and scopes (foreign keys are on). Adding columns and indexes needs no copy.
    with op.batch_alter_table("approval_requests", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("policy_version", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("policy_terms", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column(
                "approvals_required", sa.Integer(), server_default=sa.text("1"), nullable=False
            )
        )
        batch_op.add_column(
            sa.Column("escalation_level", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("escalate_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_approval_requests_escalate_at",
            ["escalate_at"],
            postgresql_where=PENDING_ESCALATION,
            sqlite_where=PENDING_ESCALATION,
        )

    with op.batch_alter_table("approval_events", recreate="never") as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    _chain_existing_events()
    # Recreated on SQLite (NOT NULL, a new constraint): safe, as no table refers to it yet.
    with op.batch_alter_table("approval_events") as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint(op.f("uq_approval_events_prev_hash"), ["prev_hash"])

    op.create_table(
        "approval_votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("approval_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "decision IN ('approve', 'deny')", name=op.f("ck_approval_votes_decision_known")
        ),
        sa.ForeignKeyConstraint(
            ["approval_id"],
            ["approval_requests.id"],
            name=op.f("fk_approval_votes_approval_id_approval_requests"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_approval_votes_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approval_votes")),
    )
    with op.batch_alter_table("approval_votes") as batch_op:
        batch_op.create_index(op.f("ix_approval_votes_approval_id"), ["approval_id"])
        batch_op.create_index(
            "uq_approval_votes_approver",
            ["approval_id", "user_id"],
            unique=True,
            postgresql_where=APPROVE_VOTE,
            sqlite_where=APPROVE_VOTE,
        )

    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("event_mask", sa.Integer(), nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("format IN ('json', 'slack')", name=op.f("ck_webhooks_format_known")),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_webhooks_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    with op.batch_alter_table("webhooks") as batch_op:
        batch_op.create_index(op.f("ix_webhooks_workspace_id"), ["workspace_id"])

    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'dead')",
            name=op.f("ck_outbox_messages_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["approval_events.id"],
            name=op.f("fk_outbox_messages_event_id_approval_events"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_outbox_messages_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint(
            "webhook_id", "event_id", name=op.f("uq_outbox_messages_webhook_id_event_id")
        ),
    )
    with op.batch_alter_table("outbox_messages") as batch_op:
        batch_op.create_index(op.f("ix_outbox_messages_event_id"), ["event_id"])
        batch_op.create_index(
            "ix_outbox_messages_due",
            ["next_attempt_at"],
            postgresql_where=PENDING_MESSAGE,
            sqlite_where=PENDING_MESSAGE,
        )

    op.create_table(
        "outbox_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["outbox_messages.id"],
            name=op.f("fk_outbox_attempts_message_id_outbox_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_attempts")),
    )
    with op.batch_alter_table("outbox_attempts") as batch_op:
        batch_op.create_index(op.f("ix_outbox_attempts_message_id"), ["message_id"])


def downgrade():
    with op.batch_alter_table("outbox_attempts") as batch_op:
        batch_op.drop_index(op.f("ix_outbox_attempts_message_id"))
    op.drop_table("outbox_attempts")
    with op.batch_alter_table("outbox_messages") as batch_op:
        batch_op.drop_index("ix_outbox_messages_due")
        batch_op.drop_index(op.f("ix_outbox_messages_event_id"))
    op.drop_table("outbox_messages")
    with op.batch_alter_table("webhooks") as batch_op:
        batch_op.drop_index(op.f("ix_webhooks_workspace_id"))
    op.drop_table("webhooks")
    with op.batch_alter_table("approval_votes") as batch_op:
        batch_op.drop_index("uq_approval_votes_approver")
        batch_op.drop_index(op.f("ix_approval_votes_approval_id"))
    op.drop_table("approval_votes")

    with op.batch_alter_table("approval_events") as batch_op:
        batch_op.drop_constraint(op.f("uq_approval_events_prev_hash"), type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")

    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a copy: see upgrade().
    with op.batch_alter_table("approval_requests", recreate="never") as batch_op:
        batch_op.drop_index("ix_approval_requests_escalate_at")
        batch_op.drop_column("escalate_at")
        batch_op.drop_column("escalation_level")
        batch_op.drop_column("approvals_required")
        batch_op.drop_column("policy_terms")
        batch_op.drop_column("policy_version")


def _chain_existing_events():
    """Hash the events already recorded, oldest first, into the chain the app continues."""
    events = sa.table(
        "approval_events",
        sa.column("id", sa.Integer()),
        sa.column("approval_id", sa.Integer()),
        sa.column("kind", sa.String()),
        sa.column("actor", sa.String()),
        sa.column("detail", sa.JSON()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("prev_hash", sa.String()),
        sa.column("hash", sa.String()),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(
            events.c.id,
            events.c.approval_id,
            events.c.kind,
            events.c.actor,
            events.c.detail,
            events.c.created_at,
        ).order_by(events.c.id)
    ).all()
    prev_hash = GENESIS
    for row in rows:
        created_at = row.created_at
        # SQLite hands back naive UTC; PostgreSQL an aware value in the session's zone.
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        content = json.dumps(
            {
                "approval_id": row.approval_id,
                "kind": row.kind,
                "actor": row.actor,
                "detail": row.detail,
                "created_at": created_at.astimezone(UTC).isoformat(timespec="microseconds"),
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        digest = hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()
        connection.execute(
            events.update().where(events.c.id == row.id).values(prev_hash=prev_hash, hash=digest)
        )
        prev_hash = digest
