"""people's actions (audited) and the outbox's queue time

- ``actions``: who did what to which object, when and why (`qcgate deliveries retry` writes one
  row per re-queued dead letter; `qcgate audit actions` reads them).
- ``deliveries.queued_at``: when a delivery (last) joined the queue; transient failures become a
  dead letter only ``delivery.dead_letter_after_hours`` after it. Existing rows get their output's
  creation time.
- ``ix_deliveries_destination_state``: one destination's pending rows, oldest first.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=True),
    sa.Column('object_id', sa.String(length=64), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('details', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('actions', schema=None) as batch_op:
        batch_op.create_index('ix_actions_at', ['at'], unique=False)
        batch_op.create_index('ix_actions_user_at', ['user', 'at'], unique=False)

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE deliveries SET queued_at = (SELECT outputs.created_at FROM outputs WHERE outputs.id = deliveries.output_id)")
    op.execute("UPDATE deliveries SET queued_at = CURRENT_TIMESTAMP WHERE queued_at IS NULL")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.alter_column('queued_at', existing_type=sa.DateTime(timezone=True), nullable=False,
                              server_default=sa.text('CURRENT_TIMESTAMP'))
        batch_op.create_index('ix_deliveries_destination_state', ['destination', 'state', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_destination_state')
        batch_op.drop_column('queued_at')

    with op.batch_alter_table('actions', schema=None) as batch_op:
        batch_op.drop_index('ix_actions_user_at')
        batch_op.drop_index('ix_actions_at')

    op.drop_table('actions')
