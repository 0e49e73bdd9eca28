"""Regressions found by the harness's mutation fuzzer (bench/harness.py, phase "fuzz"): data sets
the node acknowledged although their pixel data could not be decoded as the header states."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from qcgate.node import refusals as R
from qcgate.node.dicom_header import HeaderError, read_header
from tests.support import write_synthetic_case


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    ct_files, seg = write_synthetic_case(tmp_path_factory.mktemp("case"), n_slices=2, size=32, seed=7)
    return ct_files[0], seg


def _variant(source: Path, out: Path, **changes: object) -> Path:
    dataset = pydicom.dcmread(source)
    for keyword, value in changes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    dataset.save_as(out)
    return out


@pytest.mark.parametrize("keyword", ["SamplesPerPixel", "PhotometricInterpretation", "BitsStored", "HighBit", "PixelRepresentation"])
@pytest.mark.parametrize("which", ["ct", "seg"])
def test_an_image_pixel_attribute_deleted_is_refused(bases, tmp_path: Path, keyword: str, which: str) -> None:
    source = bases[0] if which == "ct" else bases[1]
    path = _variant(source, tmp_path / "x.dcm", **{keyword: None})
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert caught.value.code == R.MISSING_ATTRIBUTE and keyword in str(caught.value)


def test_inconsistent_bit_depths_and_a_colour_ct_are_refused(bases, tmp_path: Path) -> None:
    for changes in ({"BitsStored": 17}, {"HighBit": 16}, {"PixelRepresentation": 2}, {"SamplesPerPixel": 3}):
        with pytest.raises(HeaderError) as caught:
            read_header(_variant(bases[0], tmp_path / "x.dcm", **changes))
        assert caught.value.code == R.INVALID_ATTRIBUTE, changes


def test_pixel_data_longer_than_the_header_states_is_refused(bases, tmp_path: Path) -> None:
    # The fuzzer's case: a 2-frame BINARY SEG with 1,024 bytes appended decodes as 10 frames.
    seg = pydicom.dcmread(bases[1])
    padded = _variant(bases[1], tmp_path / "seg.dcm", PixelData=bytes(seg.PixelData) + b"\x00" * 1024)
    with pytest.raises(HeaderError) as caught:
        read_header(padded)
    assert caught.value.code == R.PIXEL_DATA
    ct = pydicom.dcmread(bases[0])
    with pytest.raises(HeaderError):
        read_header(_variant(bases[0], tmp_path / "ct.dcm", PixelData=bytes(ct.PixelData) + b"\x00\x00"))
    # exact sizes (a BINARY SEG's odd bit count padded to even bytes included) still pass
    assert read_header(bases[0]).sop_instance_uid and read_header(bases[1]).sop_instance_uid


@pytest.mark.parametrize("value", ["MONOCHrOME2", "MONOCHROM\x052", "RGB"])
def test_a_photometric_interpretation_that_cannot_be_decoded_is_refused(bases, tmp_path: Path, value: str) -> None:
    # The fuzzer's case: a flipped bit in MONOCHROME2 was acknowledged, and pixel decoding failed later.
    for source in bases:
        with pytest.raises(HeaderError) as caught:
            read_header(_variant(source, tmp_path / "x.dcm", PhotometricInterpretation=value))
        assert caught.value.code == R.INVALID_ATTRIBUTE


def test_a_c_store_request_without_an_affected_sop_instance_uid_aborts_without_a_traceback(make_gate, tmp_path: Path) -> None:
    # The fuzzer's case: an empty request UID (pynetdicom then omits the element) raised inside
    # pynetdicom's decoder on the DUL thread: a traceback, a dead reactor, a hung association.
    from pynetdicom import AE, _config

    from tests.support import CT_IMAGE_STORAGE, EXPLICIT_VR_LE, dataset_bytes_without_meta, echoscu

    gate = make_gate()
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ""
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    buffer = io.BytesIO(b"\0" * 128 + b"DICM")
    buffer.seek(132)
    write_file_meta_info(buffer, meta, enforce_standard=False)
    path = tmp_path / "empty-uid.dcm"
    path.write_bytes(buffer.getvalue() + dataset_bytes_without_meta(bases_ct(tmp_path)))
    validators, chunked = dict(_config.VALIDATORS), _config.STORE_SEND_CHUNKED_DATASET
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LE)
        ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assert status is None or "Status" not in status  # aborted, not answered
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established  # and not hung until a timeout
    finally:
        _config.VALIDATORS.update(validators)
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    incoming = gate.data_dir / "spool" / ".incoming"
    deadline = time.monotonic() + 5
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(incoming.iterdir())
    assert echoscu(gate.port).returncode == 0
    log = gate.log_text()
    assert "invalid DIMSE message" in log and "Traceback" not in log


def bases_ct(tmp_path: Path) -> Path:
    ct_files, _ = write_synthetic_case(tmp_path / "c", n_slices=1, size=32, seed=8)
    return ct_files[0]
