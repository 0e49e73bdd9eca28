"""One source of delivery targets: serve records its destinations and rules (no secrets); a worker
that would deliver with other ones refuses to start naming the destination and key, `check-config
--database` says the same, and a running worker's outbox pauses when serve records other settings."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from qcgate.config import DeliverySettings, DestinationSettings
from qcgate.delivery.fingerprint import (
    compare_with_recorded,
    delivery_document,
    fingerprint_of,
    read_recorded,
    record,
)
from qcgate.delivery.outbox import LeaseKeeper
from tests.delivery.conftest import OutboxDb

PACS = "PACS@10.0.0.5:104"


def _rules(address: str = PACS, verdicts: list[str] | None = None, **extra: object) -> DeliverySettings:
    return DeliverySettings(destination=[DestinationSettings(name="clinical-pacs", address=address,
                                                             verdicts=verdicts or ["accept", "review"], **extra)])  # type: ignore[arg-type]


def test_the_document_holds_rules_not_secrets_and_ignores_list_order() -> None:
    secret = DeliverySettings(destination=[DestinationSettings(
        name="hook", address="webhook+https://ris.example/qc", hmac_secret="s3cr3t-value")])  # type: ignore[arg-type]
    assert "s3cr3t-value" not in str(delivery_document(secret))
    assert fingerprint_of(delivery_document(_rules(verdicts=["review", "accept"]))) == fingerprint_of(delivery_document(_rules()))
    assert fingerprint_of(delivery_document(_rules(verdicts=["accept"]))) != fingerprint_of(delivery_document(_rules()))


def test_differences_name_the_destination_and_the_key(outbox_db: OutboxDb) -> None:
    record(outbox_db.session_factory, _rules())
    assert compare_with_recorded(outbox_db.session_factory, _rules())[1] == []
    _, differences = compare_with_recorded(outbox_db.session_factory, _rules(address="PACS@10.0.0.6:104"))
    assert differences == [("delivery.destination['clinical-pacs'].address: 'PACS@10.0.0.6:104' in this node, "
                            "'PACS@10.0.0.5:104' in serve's record")]
    extra = DeliverySettings(destinations=["OTHER@10.0.0.9:104"], destination=_rules().destination)
    assert compare_with_recorded(outbox_db.session_factory, extra)[1] == [
        "delivery.destination['OTHER@10.0.0.9:104']: only in this node, not in serve's record"]
    _, changes = record(outbox_db.session_factory, _rules(verdicts=["accept"]))  # serve restarted with a new rule
    assert changes == [("delivery.destination['clinical-pacs'].verdicts: ['accept'] in these settings, "
                        "['accept', 'review'] in the earlier record")]


def test_a_running_workers_outbox_pauses_while_serve_records_other_settings(outbox_db: OutboxDb) -> None:
    record(outbox_db.session_factory, _rules())
    paused = threading.Event()
    keeper = LeaseKeeper(_rules(), outbox_db.session_factory, "w:1:x", paused, check_fingerprint=True)
    keeper._check()
    assert not paused.is_set()
    record(outbox_db.session_factory, _rules(address="PACS@10.0.0.7:104"))
    keeper._check()
    assert paused.is_set()  # it would send to the old address: it claims nothing
    record(outbox_db.session_factory, _rules())
    keeper._check()
    assert not paused.is_set()


def _config(path: Path, data_dir: Path, address: str) -> Path:
    path.write_text(f'[storage]\ndata_dir = "{data_dir}"\n\n[worker]\ndeliver = true\n\n'
                    f'[[delivery.destination]]\nname = "clinical-pacs"\naddress = "{address}"\n')
    return path


def _qcgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcgate.cli", *args], capture_output=True, text=True, timeout=120, check=False)


def test_a_worker_with_another_destination_refuses_to_start_and_check_config_says_why(tmp_path: Path) -> None:
    from qcgate.config import load_settings
    from qcgate.store.database import (
        create_db_engine,
        make_session_factory,
        upgrade_database,
    )

    data_dir = tmp_path / "data"
    serves = _config(tmp_path / "serve.toml", data_dir, PACS)
    differs = _config(tmp_path / "worker.toml", data_dir, "PACS@10.0.0.8:104")
    never = _qcgate("worker", "--config", str(differs), "--workers", "0")
    assert never.returncode == 2 and "start `qcgate serve`" in never.stderr, never.stderr
    engine = create_db_engine(load_settings(serves).database_url)
    upgrade_database(engine)
    record(make_session_factory(engine), load_settings(serves).delivery)  # what serve does at start
    recorded = read_recorded(make_session_factory(engine))
    engine.dispose()
    assert recorded is not None

    refused = _qcgate("worker", "--config", str(differs), "--workers", "0")
    assert refused.returncode == 2, refused.stderr
    assert "delivery.destination['clinical-pacs'].address: 'PACS@10.0.0.8:104' in this node, 'PACS@10.0.0.5:104'" in refused.stderr
    checked = _qcgate("check-config", str(differs), "--database")
    assert checked.returncode == 2 and "delivery.destination['clinical-pacs'].address" in checked.stderr, checked.stderr
    agrees = _qcgate("check-config", str(serves), "--database")
    assert agrees.returncode == 0 and f"match those serve recorded ({recorded.fingerprint[:12]}" in agrees.stdout, agrees.stderr
