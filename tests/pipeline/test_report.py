"""The HTML report: self-contained, one thumbnail per lesion slice, decodable PNGs, no patient name."""

from __future__ import annotations

import base64
import re
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from qcgate.core.results import CaseResult, SliceResult, Verdict
from qcgate.report.html import _png_bytes, write_case_report


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for the unfiltered RGB PNGs we write."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8:start - 4], "big")
    raw = zlib.decompress(data[start:start + length])
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(_decode_png(_png_bytes(image)), image)


def test_report_has_a_thumbnail_per_lesion_slice(tmp_path: Path) -> None:
    ct = []
    for k in range(3):
        ds = Dataset()
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.PatientName = f"1.2.{k}", "1.2.99", "DOE^JANE"
        ct.append(ds)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 100
    slices = [SliceResult(source_image=ct[k], slice_index=k, ai_mask=disc, tau=0.7, q=q, margin=0.05, verdict=v,
                          lesion_area_mm2=float(disc.sum()), uncertainty_map=np.where(disc, 0.2, 0.0))
              for k, q, v in ((0, 0.9, Verdict.ACCEPT), (2, 0.4, Verdict.REJECT))]
    result = CaseResult(ct_datasets=ct, slices=slices, series_verdict=Verdict.REJECT, series_policy="strict",
                        model_name="m", model_version="1", q_source="ensemble-agreement", n_members=2, uses_uncertainty=True)
    page = write_case_report(result, tmp_path / "r.html", np.full((3, 64, 64), -800.0)).read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 1 + 2  # the tau/q plot and one thumbnail per lesion slice
    thumbnail = _decode_png(base64.b64decode(images[1]))
    assert thumbnail.shape[2] == 3 and (thumbnail == [0x2E, 0x7D, 0x32]).all(axis=2).any()  # green outline: accepted
    assert "REJECT" in page and "DOE" not in page
