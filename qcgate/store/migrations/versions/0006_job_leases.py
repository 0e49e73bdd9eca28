"""job leases: the claiming host, a heartbeat and lease_until on each job

A running job belongs to the dispatcher whose lease on it is current; recovery re-queues only jobs
whose lease has expired (or whose dispatcher is known dead on this host), never one that another
live machine runs. Columns only, all nullable: no data changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

WORKER_LENGTH = 128  # qcgate.store.models.WORKER_LENGTH when this migration was written


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker_host', sa.String(length=WORKER_LENGTH), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('worker_host')
