"""Bad input on the wire: a failure status and one log line, never a crash or a silent loss."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PYDICOM_TEST_FILES,
    dataset_bytes_without_meta,
    echoscu,
    send_raw_c_store,
    storescu,
    write_synthetic_case,
)

pytestmark = pytest.mark.slow  # slow tier: malformed input and DCMTK clients against a qcgate serve process

# pydicom's malformed test files, with the transfer syntax their data set is encoded in.
MALFORMED = [
    ("MR_truncated.dcm", EXPLICIT_VR_LE),
    ("rtplan_truncated.dcm", IMPLICIT_VR_LE),
    ("badVR.dcm", EXPLICIT_VR_LE),
    ("no_meta.dcm", IMPLICIT_VR_LE),
    ("ExplVR_BigEndNoMeta.dcm", EXPLICIT_VR_LE),
    ("meta_missing_tsyntax.dcm", IMPLICIT_VR_LE),
    ("no_meta_group_length.dcm", IMPLICIT_VR_LE),
    ("UN_sequence.dcm", EXPLICIT_VR_LE),
    ("empty_charset_LEI.dcm", IMPLICIT_VR_LE),
]


def test_each_malformed_pydicom_file_is_refused_and_the_node_keeps_serving(gate) -> None:
    for name, syntax in MALFORMED:
        payload = dataset_bytes_without_meta(PYDICOM_TEST_FILES / name)
        status = send_raw_c_store(gate.port, payload, transfer_syntax=syntax, sop_instance="1.2.3.999." + str(len(payload)))
        assert status is not None and status != 0x0000, f"{name} was acknowledged"
        assert status in (0xA900, 0xC000) or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF, f"{name}: {status:#06x}"
        assert echoscu(gate.port).returncode == 0, f"node stopped serving after {name}"
    refused = gate.sql("SELECT reason_code, quarantine_path FROM refused_instances")
    assert len(refused) == len(MALFORMED)
    for _, quarantined in refused:
        sidecar = Path(quarantined).with_suffix(".json")
        assert Path(quarantined).is_relative_to(gate.data_dir / "quarantine")
        assert json.loads(sidecar.read_text())["reason"]
    assert gate.sql("SELECT count(*) FROM instances") == [(0,)]
    assert gate.process.poll() is None


def test_random_truncations_and_garbage_get_failure_statuses(gate) -> None:
    rng = np.random.default_rng(20261129)
    valid = dataset_bytes_without_meta(PYDICOM_TEST_FILES / "CT_small.dcm")
    payloads = [bytes(rng.integers(0, 256, 300, dtype=np.uint8))]
    payloads += [valid[: int(cut)] for cut in rng.integers(10, 600, 4)]  # cut inside the header
    for index, payload in enumerate(payloads):
        status = send_raw_c_store(gate.port, payload, sop_instance=f"1.2.3.888.{index}")
        assert status is not None and status != 0x0000
    assert echoscu(gate.port).returncode == 0


def test_ct_without_the_uids_the_gate_needs_is_refused_with_a900(gate, tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.SeriesInstanceUID = ""
    path = tmp_path / "blank_series.dcm"
    ds.save_as(path)
    status = send_raw_c_store(gate.port, dataset_bytes_without_meta(path), sop_instance=str(ds.SOPInstanceUID))
    assert status == 0xA900
    assert gate.sql("SELECT reason_code FROM refused_instances") == [("missing-attribute",)]
    assert "SeriesInstanceUID is missing or blank" in gate.log_text()


def test_other_sop_classes_are_refused_at_negotiation(gate) -> None:
    result = storescu(gate.port, [PYDICOM_TEST_FILES / "MR_small.dcm"])
    assert result.returncode != 0
    assert "No presentation context" in result.stderr or "No Acceptable Presentation Contexts" in result.stderr
    assert gate.sql("SELECT count(*) FROM instances") == [(0,)]


def test_a_uid_crafted_to_traverse_paths_stays_inside_the_spool(gate, tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID = "../../../../../../tmp"
    ds.SeriesInstanceUID = "/etc"
    ds.SOPInstanceUID = "../../../evil"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "evil.dcm"
    ds.save_as(path)
    status = send_raw_c_store(gate.port, dataset_bytes_without_meta(path), sop_instance="../../../evil")
    # Not a PS3.5 UID: refused for good (issue 15), and kept, like every refusal, inside the data dir.
    assert status == 0xA900
    assert gate.sql("SELECT count(*) FROM instances") == [(0,)]
    ((code, kept),) = gate.sql("SELECT reason_code, quarantine_path FROM refused_instances")
    assert code == "invalid-uid" and Path(kept).resolve().is_relative_to((gate.data_dir / "quarantine").resolve())
    assert not Path("/tmp/evil.dcm").exists()
    every_file = [p for p in gate.data_dir.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(gate.data_dir.resolve()) for p in every_file)


def test_identical_resend_is_success_without_duplicate_rows(gate, tmp_path: Path) -> None:
    ct_files, seg = write_synthetic_case(tmp_path / "case", n_slices=3)
    assert storescu(gate.port, ct_files).returncode == 0
    assert storescu(gate.port, ct_files).returncode == 0
    assert gate.sql("SELECT count(*) FROM instances") == [(3,)]
    assert gate.sql("SELECT count(*) FROM refused_instances") == [(0,)]


def test_conflicting_resend_keeps_the_first_copy_and_sets_the_new_one_aside(gate, tmp_path: Path) -> None:
    ct_files, _ = write_synthetic_case(tmp_path / "case", n_slices=1)
    first = ct_files[0]
    assert storescu(gate.port, [first]).returncode == 0
    changed = pydicom.dcmread(first)
    changed.ImageComments = "a different version with the same SOP Instance UID"
    second = tmp_path / "changed.dcm"
    changed.save_as(second)
    assert storescu(gate.port, [second]).returncode == 0
    ((spool_path, digest),) = gate.sql("SELECT spool_path, sha256 FROM instances")
    kept = (gate.data_dir / "spool" / spool_path).read_bytes()
    assert hashlib.sha256(kept).hexdigest() == digest
    assert b"a different version" not in kept
    ((code, aside),) = gate.sql("SELECT reason_code, quarantine_path FROM refused_instances")
    assert code == "conflict"
    assert b"a different version" in Path(aside).read_bytes()
    assert "conflicting re-send" in gate.log_text()


def test_disk_below_the_watermark_is_refused_with_a700(make_gate, tmp_path: Path) -> None:
    gate = make_gate(storage={"min_free_mb": 1e12})
    ct_files, _ = write_synthetic_case(tmp_path / "case", n_slices=1)
    result = storescu(gate.port, ct_files, verbose=True)
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stdout + result.stderr
    assert gate.sql("SELECT reason_code, dimse_status FROM refused_instances") == [("disk-full", 0xA700)]
    assert gate.sql("SELECT count(*) FROM instances") == [(0,)]
    assert not any((gate.data_dir / "spool" / ".incoming").iterdir())


def test_wrong_value_lengths_in_the_header_are_quarantined_not_a_handler_crash(gate) -> None:
    payload = bytearray(dataset_bytes_without_meta(PYDICOM_TEST_FILES / "CT_small.dcm"))
    columns = bytes.fromhex("28001100") + b"US" + (2).to_bytes(2, "little")
    at = payload.index(columns)
    # A 1-byte US value: the length field says 1 and one value byte is dropped.
    corrupted = payload[:at] + bytes.fromhex("28001100") + b"US" + (1).to_bytes(2, "little") + payload[at + 8:at + 9] + payload[at + 10:]
    status = send_raw_c_store(gate.port, bytes(corrupted), sop_instance=str(pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm").SOPInstanceUID))
    assert status == 0xC000  # not 0xC211, pynetdicom's "the handler raised"
    ((code, kept),) = gate.sql("SELECT reason_code, quarantine_path FROM refused_instances")
    assert code == "unparseable" and Path(kept).exists()
