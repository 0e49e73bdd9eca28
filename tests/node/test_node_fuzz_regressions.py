"""Regressions found by the harness's mutation fuzzer (bench/harness.py, phase "fuzz"): data sets
the node acknowledged although their pixel data could not be decoded as the header states."""

from __future__ import annotations

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
