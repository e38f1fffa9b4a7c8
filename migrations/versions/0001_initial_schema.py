"""initial schema: workspaces, tokens, approvals

Revision ID: 0001
Revises:

Reviewed by hand: the partial indexes on approval_requests carry both postgresql_where and
sqlite_where (autogenerate does not compare predicates). uq_approval_requests_pending_key is
what makes the gate's conditional insert a dedup; ix_approval_requests_approved_key serves the
consume lookup.
Create Date: 2026-11-25 11:51:19.429778

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('workspaces',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['workspaces.id'], name=op.f('fk_workspaces_parent_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workspaces'))
    )
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workspaces_parent_id'), ['parent_id'], unique=False)

    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('prefix', sa.String(length=24), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('workspace_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('agent', 'user', 'service')", name=op.f('ck_api_tokens_kind_known')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_api_tokens_workspace_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_workspace_id'), ['workspace_id'], unique=False)

    op.create_table('memberships',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('workspace_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("role IN ('owner', 'approver', 'viewer')", name=op.f('ck_memberships_role_known')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_memberships_user_id_users'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_memberships_workspace_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_memberships')),
    sa.UniqueConstraint('workspace_id', 'user_id', name=op.f('uq_memberships_workspace_id_user_id'))
    )
    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_memberships_user_id'), ['user_id'], unique=False)

    op.create_table('secrets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('workspace_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], name=op.f('fk_secrets_workspace_id_workspaces'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_secrets')),
    sa.UniqueConstraint('workspace_id', 'name', name=op.f('uq_secrets_workspace_id_name'))
    )
    op.create_table('approval_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('workspace_id', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('summary', sa.Text(), nullable=False),
    sa.Column('context', sa.JSON(), nullable=False),
    sa.Column('workspace_path', sa.JSON(), nullable=False),
    sa.Column('requested_by_token_id', sa.Integer(), nullable=True),
    sa.Column('requested_by_kind', sa.String(length=16), nullable=False),
    sa.Column('requested_by_name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_by_user_id', sa.Integer(), nullable=True),
    sa.Column('decided_by_name', sa.String(length=64), nullable=True),
    sa.Column('decided_level', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('approval_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'approved', 'denied', 'expired', 'consumed', 'withdrawn')", name=op.f('ck_approval_requests_status_known')),
    sa.ForeignKeyConstraint(['decided_by_user_id'], ['users.id'], name=op.f('fk_approval_requests_decided_by_user_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['requested_by_token_id'], ['api_tokens.id'], name=op.f('fk_approval_requests_requested_by_token_id_api_tokens'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_approval_requests'))
    )
    with op.batch_alter_table('approval_requests', schema=None) as batch_op:
        batch_op.create_index('ix_approval_requests_approved_key', ['workspace_id', 'action', 'request_hash'], unique=False, postgresql_where=sa.text("status = 'approved'"), sqlite_where=sa.text("status = 'approved'"))
        batch_op.create_index('ix_approval_requests_denied_key', ['workspace_id', 'action', 'request_hash', 'decided_at'], unique=False, postgresql_where=sa.text("status = 'denied'"), sqlite_where=sa.text("status = 'denied'"))
        batch_op.create_index('ix_approval_requests_status_created_at', ['status', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_approval_requests_workspace_id'), ['workspace_id'], unique=False)
        batch_op.create_index('uq_approval_requests_pending_key', ['workspace_id', 'action', 'request_hash'], unique=True, postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))

    op.create_table('approval_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('approval_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=160), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['approval_id'], ['approval_requests.id'], name=op.f('fk_approval_events_approval_id_approval_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_approval_events'))
    )
    with op.batch_alter_table('approval_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_approval_events_approval_id'), ['approval_id'], unique=False)

    op.create_table('approval_scopes',
    sa.Column('approval_id', sa.Integer(), nullable=False),
    sa.Column('workspace_id', sa.Integer(), nullable=False),
    sa.Column('level', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['approval_id'], ['approval_requests.id'], name=op.f('fk_approval_scopes_approval_id_approval_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('approval_id', 'workspace_id', name=op.f('pk_approval_scopes'))
    )
    with op.batch_alter_table('approval_scopes', schema=None) as batch_op:
        batch_op.create_index('ix_approval_scopes_workspace_id_approval_id', ['workspace_id', 'approval_id'], unique=False)



def downgrade():
    with op.batch_alter_table('approval_scopes', schema=None) as batch_op:
        batch_op.drop_index('ix_approval_scopes_workspace_id_approval_id')

    op.drop_table('approval_scopes')
    with op.batch_alter_table('approval_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_approval_events_approval_id'))

    op.drop_table('approval_events')
    with op.batch_alter_table('approval_requests', schema=None) as batch_op:
        batch_op.drop_index('uq_approval_requests_pending_key', postgresql_where=sa.text("status = 'pending'"), sqlite_where=sa.text("status = 'pending'"))
        batch_op.drop_index(batch_op.f('ix_approval_requests_workspace_id'))
        batch_op.drop_index('ix_approval_requests_status_created_at')
        batch_op.drop_index('ix_approval_requests_denied_key', postgresql_where=sa.text("status = 'denied'"), sqlite_where=sa.text("status = 'denied'"))
        batch_op.drop_index('ix_approval_requests_approved_key', postgresql_where=sa.text("status = 'approved'"), sqlite_where=sa.text("status = 'approved'"))

    op.drop_table('approval_requests')
    op.drop_table('secrets')
    with op.batch_alter_table('memberships', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_memberships_user_id'))

    op.drop_table('memberships')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_workspace_id'))

    op.drop_table('api_tokens')
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workspaces_parent_id'))

    op.drop_table('workspaces')
    op.drop_table('users')
