"""People's actions, audited: one ``actions`` row per thing someone did to the data.

Call :func:`record_action` inside the transaction that makes the change, so the change and its
audit row are committed together or not at all.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from qcgate.store.models import Action


def record_action(session: Session, *, user: str, action: str, object_type: str | None = None,
                  object_id: str | int | None = None, reason: str | None = None,
                  details: dict[str, Any] | None = None) -> Action:
    """Add an ``actions`` row (flushed, not committed): ``user`` did ``action`` to the object, because ``reason``."""
    if not user or not user.strip():
        raise ValueError("an audited action needs the user who did it")
    row = Action(user=user.strip(), action=action, object_type=object_type,
                 object_id=None if object_id is None else str(object_id), reason=reason,
                 details=json.dumps(details, sort_keys=True, default=str) if details is not None else None)
    session.add(row)
    session.flush()
    return row
