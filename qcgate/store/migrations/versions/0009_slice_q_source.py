"""slice results name their q source, their reject margin and why review was forced

- ``slice_results.q_source``: where the slice's q came from ("learned-um", "reference", "none", ...);
  rows made before 0009 carry their case's ``cases.q_source``.
- ``slice_results.margin_reject``: the band's reject margin m_reject (reject if q < tau - m_reject;
  ``margin`` stays m_accept); NULL for rows made before 0009 (their rule was symmetric: m_reject = margin).
- ``slice_results.review_reason``: why review was forced (out of the model's domain, no q estimator),
  NULL otherwise.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('q_source', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('margin_reject', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('review_reason', sa.Text(), nullable=True))
    op.execute("UPDATE slice_results SET q_source = (SELECT cases.q_source FROM cases WHERE cases.id = slice_results.case_id)")


def downgrade() -> None:
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.drop_column('review_reason')
        batch_op.drop_column('margin_reject')
        batch_op.drop_column('q_source')
