"""delivery leases: any node sends, one at a time per row; one backoff per destination; shared settings

- ``deliveries.sender`` / ``lease_until``: the node sending a pending row and until when; a row whose
  lease is past is claimed again by any node (its sender died mid-send).
- ``delivery_attempts.sender``: which node made the attempt.
- ``destination_states``: one row per destination: consecutive transient failures, ``next_attempt_at``
  (the shared backoff, or the lease of the one probe in flight) and the probing node.
- ``shared_settings``: what `qcgate serve` recorded at start (name ``delivery``: destinations and
  rules, no secrets, with their SHA-256); a delivering `qcgate worker` must match it.

Columns are nullable and tables new: no data changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 12:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# qcgate.store.models' widths when this migration was written
WORKER_LENGTH = 128
DESTINATION_LENGTH = 128
SHARED_SETTINGS_NAME_LENGTH = 64
FINGERPRINT_LENGTH = 64


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sender', sa.String(length=WORKER_LENGTH), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sender', sa.String(length=WORKER_LENGTH), nullable=True))
    op.create_table(
        'destination_states',
        sa.Column('destination', sa.String(length=DESTINATION_LENGTH), nullable=False),
        sa.Column('consecutive_failures', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('prober', sa.String(length=WORKER_LENGTH), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('destination'),
    )
    op.create_table(
        'shared_settings',
        sa.Column('name', sa.String(length=SHARED_SETTINGS_NAME_LENGTH), nullable=False),
        sa.Column('fingerprint', sa.String(length=FINGERPRINT_LENGTH), nullable=False),
        sa.Column('document', sa.Text(), nullable=False),
        sa.Column('recorded_by', sa.String(length=WORKER_LENGTH), nullable=False),
        sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('shared_settings')
    op.drop_table('destination_states')
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_column('sender')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('sender')
