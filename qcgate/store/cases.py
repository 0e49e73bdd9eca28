"""Case membership, decided when an instance is recorded: which case it joins, and its quiet timer.

A case is one CT series plus the SEG instances that reference it. The node calls these in the same
transaction that records the instance; the assembler (``qcgate.pipeline.assembler``) later reads
the rows to decide readiness. Both meet only in the database.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import case as sql_case
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcgate.core.dicom import InstanceHeader
from qcgate.store.models import Case, CaseState, Instance, utcnow


def case_series_for(session: Session, header: InstanceHeader) -> str | None:
    """The CT series UID whose case this instance joins.

    CT: its own series. SEG: the first referenced series; when the SEG names none, the series of a
    referenced CT instance already received.
    """
    if not header.is_segmentation:
        return header.series_instance_uid
    if header.referenced_series_uids:
        return header.referenced_series_uids[0]
    sop_uids = sorted(header.referenced_sop_instance_uids)[:500]
    if not sop_uids:
        return None
    return session.scalar(
        select(Instance.series_instance_uid).where(Instance.sop_instance_uid.in_(sop_uids)).limit(1)
    )


def get_or_create_case_id(session: Session, study_uid: str, ct_series_uid: str) -> int:
    """The id of the case for ``ct_series_uid``, created if new (safe against a concurrent creator)."""
    case_id = session.scalar(select(Case.id).where(Case.ct_series_uid == ct_series_uid))
    if case_id is not None:
        return int(case_id)
    try:
        with session.begin_nested():
            case_id = session.execute(
                insert(Case).values(study_instance_uid=study_uid, ct_series_uid=ct_series_uid,
                                    state=CaseState.COLLECTING.value, created_at=utcnow(), last_instance_at=utcnow())
                .returning(Case.id)
            ).scalar_one()
    except IntegrityError:
        case_id = session.scalars(select(Case.id).where(Case.ct_series_uid == ct_series_uid)).one()
    return int(case_id)


def touch_case(session: Session, case_id: int, now: dt.datetime) -> None:
    """Restart a case's quiet timer; a late instance reopens an incomplete case."""
    incomplete = Case.state == CaseState.INCOMPLETE.value
    session.execute(
        update(Case).where(Case.id == case_id).values(
            last_instance_at=now,
            state=sql_case((incomplete, CaseState.COLLECTING.value), else_=Case.state),
            reason=sql_case((incomplete, None), else_=Case.reason),
        )
    )
