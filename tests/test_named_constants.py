"""Refusal codes and column widths have names; the names agree with what they describe."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from qcgate.core.refusals import DIMSE_STATUS, STATUS_CANNOT_UNDERSTAND, RefusalCode, dimse_status_for
from qcgate.store.database import upgrade_database
from qcgate.store.models import REASON_CODE_LENGTH, Base


def test_every_refusal_code_fits_its_column_and_has_a_status() -> None:
    assert all(len(code.value) <= REASON_CODE_LENGTH for code in RefusalCode)
    assert set(DIMSE_STATUS) == set(RefusalCode)
    assert dimse_status_for("no-such-code") == STATUS_CANNOT_UNDERSTAND


def test_the_node_answers_with_core_refusals() -> None:
    from qcgate.node import refusals as node_refusals

    assert node_refusals.STATUS_FOR_CODE is DIMSE_STATUS and node_refusals.status_for is dimse_status_for
    assert all(getattr(node_refusals, code.name) is code for code in RefusalCode)


def test_the_migrations_build_the_models_column_widths() -> None:
    engine = sa.create_engine("sqlite://")
    upgrade_database(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, Base.metadata) if "String" in repr(d) or "VARCHAR" in repr(d)]
    assert differences == []
