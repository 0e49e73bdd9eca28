"""audit indexes: verdict/date, vendor, algorithm, calling AE, model version, output UID

The indexes behind `qcgate audit` filters and retention by age (bench/bench_audit.py measures
them on a million slice rows). Indexes only: no data changes, so up and down are cheap.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 05:39:40.967989
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.create_index('ix_associations_calling_ae', ['calling_ae'], unique=False)

    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.create_index('ix_cases_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_cases_model_version', ['model_version'], unique=False)
        batch_op.create_index('ix_cases_verdict_created', ['series_verdict', 'created_at'], unique=False)

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_algorithm_case', ['algorithm_name', 'case_id'], unique=False)
        batch_op.create_index('ix_instances_association', ['association_id'], unique=False)
        batch_op.create_index('ix_instances_manufacturer_case', ['manufacturer', 'case_id'], unique=False)

    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.create_index('ix_outputs_sop', ['sop_instance_uid'], unique=False)

    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.create_index('ix_slice_results_created', ['created_at'], unique=False)
        batch_op.create_index('ix_slice_results_verdict_created', ['verdict', 'created_at'], unique=False)
        batch_op.create_index('ix_slice_results_case_verdict_created', ['case_id', 'verdict', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('slice_results', schema=None) as batch_op:
        batch_op.drop_index('ix_slice_results_case_verdict_created')
        batch_op.drop_index('ix_slice_results_verdict_created')
        batch_op.drop_index('ix_slice_results_created')

    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.drop_index('ix_outputs_sop')

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_manufacturer_case')
        batch_op.drop_index('ix_instances_association')
        batch_op.drop_index('ix_instances_algorithm_case')

    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_index('ix_cases_verdict_created')
        batch_op.drop_index('ix_cases_model_version')
        batch_op.drop_index('ix_cases_created_at')

    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.drop_index('ix_associations_calling_ae')
