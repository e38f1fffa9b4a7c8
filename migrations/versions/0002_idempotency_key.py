"""approval_requests.idempotency_key

Revision ID: 0002
Revises: 0001

Reviewed by hand: the partial index carries both postgresql_where and sqlite_where.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WHERE = sa.text("idempotency_key IS NOT NULL")


def upgrade():
    with op.batch_alter_table("approval_requests") as batch_op:
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.create_index(
            "ix_approval_requests_idempotency",
            ["requested_by_token_id", "idempotency_key"],
            postgresql_where=WHERE,
            sqlite_where=WHERE,
        )


def downgrade():
    with op.batch_alter_table("approval_requests") as batch_op:
        batch_op.drop_index("ix_approval_requests_idempotency")
        batch_op.drop_column("idempotency_key")
