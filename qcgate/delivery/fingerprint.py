"""One source of delivery targets: the destinations and rules `qcgate serve` recorded in the database.

The router (in `serve`) decides which destinations a case reaches; any delivering node then sends
the rows to the destination they name. A node can only send correctly if its idea of each name
(address, transport, TLS) is serve's, so `serve` records, at every start, the canonical document of
its ``[delivery]`` destinations and rules in ``shared_settings`` (name ``delivery``), with

    fingerprint = SHA-256(canonical JSON(document))

Secrets (tokens, passwords, HMAC secrets) and file paths (certificates, secret files: they may lie
elsewhere on another machine) are left out; names, types, addresses, objects, verdicts, TLS on/off,
host-name checking, user names and the shared delivery policy (dead-letter age, backoff, lease) are
in. A `qcgate worker` with ``worker.deliver`` refuses to start when its document differs, naming
each differing destination and key; its outbox stops claiming when serve later records another.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from qcgate.config import DeliverySettings
from qcgate.store.models import SharedSettings, utcnow

DELIVERY = "delivery"
_DESTINATION_KEYS = ("type", "address", "objects", "verdicts", "tls", "tls_check_hostname", "username")
_POLICY_KEYS = ("dead_letter_after_hours", "backoff_base_seconds", "backoff_max_seconds", "lease_seconds")


def _plain(value: Any) -> Any:
    """Lists of objects or verdicts are sets: their order in a file does not matter."""
    return sorted(value) if isinstance(value, list) else value


def delivery_document(settings: DeliverySettings) -> dict[str, Any]:
    """The destinations (by name) with their rules, and the shared policy; no secrets, no paths."""
    return {
        "destinations": {target.key: {key: _plain(getattr(target, key)) for key in _DESTINATION_KEYS} for target in settings.targets()},
        "policy": {key: getattr(settings, key) for key in _POLICY_KEYS},
    }


def canonical(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def fingerprint_of(document: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``document``."""
    return hashlib.sha256(canonical(document).encode()).hexdigest()


@dataclass(frozen=True)
class Recorded:
    fingerprint: str
    document: dict[str, Any]
    recorded_by: str
    recorded_at: Any


def read_recorded(session_factory: sessionmaker[Session]) -> Recorded | None:
    """What serve recorded, or None (serve has not started on this database since 0008)."""
    with session_factory() as session:
        if not inspect(session.get_bind()).has_table(SharedSettings.__tablename__):
            return None
        row = session.get(SharedSettings, DELIVERY)
        if row is None:
            return None
        return Recorded(row.fingerprint, json.loads(row.document), row.recorded_by, row.recorded_at)


def record(session_factory: sessionmaker[Session], settings: DeliverySettings) -> tuple[str, list[str]]:
    """serve's start: record its delivery document; (the fingerprint, what changed since the last record)."""
    document = delivery_document(settings)
    fingerprint = fingerprint_of(document)
    earlier = read_recorded(session_factory)
    with session_factory() as session, session.begin():
        row = session.get(SharedSettings, DELIVERY, with_for_update=True)
        if row is None:
            row = SharedSettings(name=DELIVERY)
            session.add(row)
        row.fingerprint, row.document = fingerprint, canonical(document)
        row.recorded_by, row.recorded_at = f"{socket.gethostname()}:{os.getpid()}", utcnow()
    changes = differences(document, earlier.document, "these settings", "the earlier record") \
        if earlier is not None and earlier.fingerprint != fingerprint else []
    return fingerprint, changes


def differences(mine: dict[str, Any], recorded: dict[str, Any], mine_name: str = "this node",
                recorded_name: str = "serve's record") -> list[str]:
    """Each difference, naming the destination and key: ``delivery.destination["PACS"].address: ...``."""
    out = []
    ours, theirs = mine.get("destinations", {}), recorded.get("destinations", {})
    for name in sorted(set(ours) | set(theirs)):
        label = f"delivery.destination[{name!r}]"
        if name not in theirs:
            out.append(f"{label}: only in {mine_name}, not in {recorded_name}")
        elif name not in ours:
            out.append(f"{label}: in {recorded_name} ({theirs[name].get('address')}), missing from {mine_name}")
        else:
            for key in sorted(set(ours[name]) | set(theirs[name])):
                if ours[name].get(key) != theirs[name].get(key):
                    out.append(f"{label}.{key}: {ours[name].get(key)!r} in {mine_name}, {theirs[name].get(key)!r} in {recorded_name}")
    ours_policy, theirs_policy = mine.get("policy", {}), recorded.get("policy", {})
    for key in sorted(set(ours_policy) | set(theirs_policy)):
        if ours_policy.get(key) != theirs_policy.get(key):
            out.append(f"delivery.{key}: {ours_policy.get(key)!r} in {mine_name}, {theirs_policy.get(key)!r} in {recorded_name}")
    return out


def compare_with_recorded(session_factory: sessionmaker[Session], settings: DeliverySettings) -> tuple[Recorded | None, list[str]]:
    """(serve's record, the differences of ``settings`` from it); no record: (None, [])."""
    recorded = read_recorded(session_factory)
    if recorded is None:
        return None, []
    document = delivery_document(settings)
    if fingerprint_of(document) == recorded.fingerprint:
        return recorded, []
    return recorded, differences(document, recorded.document) or ["the fingerprints differ (recorded by another qcgate version?)"]
