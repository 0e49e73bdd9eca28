"""Issue 10: the Secondary Capture series and the Encapsulated PDF pass dciodvfy and read back; one
slice numbering (the CT InstanceNumber) in the SR, the report, the SC and the PDF; the report and the
PDF as a person sees them (headless chromium, pdftoppm: non-blank PNGs, copies kept for a look)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from qcgate.report.html import write_case_report
from qcgate.report.pdf import render_case_pdf
from qcgate.writers.common import slice_location
from qcgate.writers.pdf import ENCAPSULATED_PDF_STORAGE, write_qc_pdf
from qcgate.writers.sc import write_qc_sc_series
from qcgate.writers.seg import write_qc_seg
from qcgate.writers.sr import read_qc_sr, write_qc_sr
from qcgate.writers.validate import dciodvfy_errors
from tests.writers.conftest import WriterCase

SCREENSHOTS = Path("/tmp/qcgate-screenshots/viewer")


def _hu(case: WriterCase) -> np.ndarray:
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in case.result.ct_datasets])


def test_sc_series_is_valid_in_the_ct_study_and_references_its_images(synthetic_case: WriterCase, tmp_path: Path) -> None:
    paths = write_qc_sc_series(synthetic_case.result, tmp_path, _hu(synthetic_case), model_synthetic=True)
    assert len(paths) == 1 + len(synthetic_case.result.slices)
    ct = synthetic_case.result.ct_datasets[0]
    series = set()
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
        image = hd.imread(path)
        assert image.StudyInstanceUID == ct.StudyInstanceUID and image.SeriesInstanceUID != ct.SeriesInstanceUID
        assert image.SeriesDescription.startswith("SYNTHETIC") and image.BurnedInAnnotation == "YES"
        series.add(image.SeriesInstanceUID)
        assert image.pixel_array.ndim == 3 and image.pixel_array.std() > 10  # not blank
    assert len(series) == 1
    ordered = sorted(synthetic_case.result.slices, key=lambda s: s.slice_index)
    for path, item in zip(paths[1:], ordered):
        ds = pydicom.dcmread(path)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == item.source_image.SOPInstanceUID
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == item.source_image.SOPInstanceUID
    summary = pydicom.dcmread(paths[0])
    assert {str(r.ReferencedSOPInstanceUID) for r in summary.ReferencedImageSequence} == set(synthetic_case.expected_verdicts)


def test_sc_outline_colour_and_style_follow_the_verdict(synthetic_case: WriterCase, tmp_path: Path) -> None:
    from qcgate.writers.sc import VERDICT_RGB

    paths = write_qc_sc_series(synthetic_case.result, tmp_path, _hu(synthetic_case))
    ordered = sorted(synthetic_case.result.slices, key=lambda s: s.slice_index)
    for path, item in zip(paths[1:], ordered):
        pixels = pydicom.dcmread(path).pixel_array
        assert (pixels == VERDICT_RGB[item.verdict]).all(axis=2).sum() > 20, item.verdict


def test_pdf_is_valid_and_reads_back(synthetic_case: WriterCase, tmp_path: Path) -> None:
    document = render_case_pdf(synthetic_case.result, _hu(synthetic_case), model_synthetic=True)
    path = write_qc_pdf(synthetic_case.result, document, tmp_path / "qc-report-pdf.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.StudyInstanceUID == synthetic_case.result.ct_datasets[0].StudyInstanceUID
    assert bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)] == document
    assert "PatientName" not in ds or "SYNTH" not in document.decode("latin-1")


def test_one_slice_numbering_in_sr_report_sc_and_pdf(synthetic_case: WriterCase, tmp_path: Path) -> None:
    """The CT InstanceNumber (not the slice index, not index + 1) everywhere."""
    numbers = {str(s.source_image.SOPInstanceUID): slice_location(s.source_image).instance_number
               for s in synthetic_case.result.slices}
    assert all(n is not None for n in numbers.values())
    seg = pydicom.dcmread(write_qc_seg(synthetic_case.result, tmp_path / "seg.dcm"), stop_before_pixels=True)
    sr = read_qc_sr(write_qc_sr(synthetic_case.result, tmp_path / "sr.dcm", qc_seg=seg))
    assert {s.sop_instance_uid: s.instance_number for s in sr.slices} == numbers
    page = write_case_report(synthetic_case.result, tmp_path / "r.html", _hu(synthetic_case)).read_text()
    for number in numbers.values():
        assert re.search(rf"<b>CT image {number} \(z ", page), number
        assert f"<tr><td>{number}</td>" in page
    assert not re.search(r"Lesion slice \d", page)


def _non_blank(png: Path) -> None:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_report_and_pdf_as_a_person_sees_them(synthetic_case: WriterCase, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if chromium is None or shutil.which("pdftoppm") is None:
        if os.environ.get("QCGATE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium or pdftoppm missing and QCGATE_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium or pdftoppm not installed")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    html = write_case_report(synthetic_case.result, tmp_path / "report.html", _hu(synthetic_case), model_synthetic=True)
    shot = tmp_path / "report-html.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--window-size=1200,1800", f"--screenshot={shot}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    _non_blank(shot)
    shutil.copy(shot, SCREENSHOTS / "test-report-html.png")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(render_case_pdf(synthetic_case.result, _hu(synthetic_case), model_synthetic=True))
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "report-pdf")],
                   check=True, capture_output=True, timeout=60)
    page = next(tmp_path.glob("report-pdf*.png"))
    _non_blank(page)
    shutil.copy(page, SCREENSHOTS / "test-report-pdf-1.png")
