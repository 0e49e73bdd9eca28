"""routing by verdict: held deliveries, routed outputs, several AI SEG outputs per case

- ``outputs.routed_at``: when `serve`'s router gave the output its delivery rows; existing outputs
  were routed by the worker that made them, so they get their creation time.
- ``deliveries.held_at``: a delivery held for a reviewer's decision (state ``held``; released to
  ``pending`` or ``discarded``). The state column is a plain string: no enum to alter.
- ``uq_output_job_kind`` becomes ``uq_output_job_kind_path``: a case with two AI SEGs has two
  ``ai-seg`` outputs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 18:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_constraint('uq_output_job_kind', type_='unique')
        batch_op.create_unique_constraint('uq_output_job_kind_path', ['job_id', 'kind', 'path'])
        batch_op.create_index('ix_outputs_routed_at', ['routed_at'], unique=False)
    op.execute("UPDATE outputs SET routed_at = created_at")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('held_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Held and discarded deliveries have no meaning before 0007: discarded ones go, held ones die.
    op.execute("DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE state = 'discarded')")
    op.execute("DELETE FROM deliveries WHERE state = 'discarded'")
    op.execute("UPDATE deliveries SET state = 'dead', last_error = 'held for review when downgraded' WHERE state = 'held'")
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('held_at')
    op.execute("DELETE FROM delivery_attempts WHERE delivery_id IN (SELECT d.id FROM deliveries d JOIN outputs o ON o.id = d.output_id WHERE o.kind = 'ai-seg')")
    op.execute("DELETE FROM deliveries WHERE output_id IN (SELECT id FROM outputs WHERE kind = 'ai-seg')")
    op.execute("DELETE FROM outputs WHERE kind = 'ai-seg'")
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.drop_index('ix_outputs_routed_at')
        batch_op.drop_constraint('uq_output_job_kind_path', type_='unique')
        batch_op.create_unique_constraint('uq_output_job_kind', ['job_id', 'kind'])
        batch_op.drop_column('routed_at')
