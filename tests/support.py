"""Shared test helpers: data locations, DICOM builders, and real DCMTK / pynetdicom clients.

Test data is named here once (pydicom habit) instead of being scattered through the tests.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
SHARED_DICOM = SHARED / "data" / "dicom"
DCMQI_LIVER = SHARED_DICOM / "dcmqi-liver-ct-seg"
HIGHDICOM_FILES = SHARED_DICOM / "highdicom-testfiles"
GANTRY_TILT_CT = SHARED_DICOM / "ge-head-ct-gantry-tilt"
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"


_XDIST_PORT_BASE = 20000  # below Linux's ephemeral range (32768+), so no outgoing connection takes one
_XDIST_PORTS_PER_WORKER = 500
_next_port_offset = 0


def free_port() -> int:
    """A loopback TCP port that is free now. Under pytest-xdist each worker draws from its own block
    below the ephemeral range, so two workers never pick the same port between choosing and binding."""
    global _next_port_offset
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... when run with -n
    if not worker.startswith("gw"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    base = _XDIST_PORT_BASE + int(worker[2:]) * _XDIST_PORTS_PER_WORKER
    for _ in range(_XDIST_PORTS_PER_WORKER):
        port = base + _next_port_offset
        _next_port_offset = (_next_port_offset + 1) % _XDIST_PORTS_PER_WORKER
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + _XDIST_PORTS_PER_WORKER - 1} for xdist worker {worker}")


def dcmtk_env() -> dict[str, str]:
    # Without TCP_NODELAY, Nagle's algorithm makes DCMTK tools 30x slower on loopback.
    return {**os.environ, "TCP_NODELAY": "1"}


# storescu proposes a compressed transfer syntax only when told to.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.2": "-xb",
}


def storescu(port: int, files: Sequence[Path], *, calling: str = "STORESCU", called: str = "QCGATE",
             verbose: bool = False, timeout: float = 300, propose: str | None = None) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu, proposing exactly the contexts they need (-R).

    ``propose`` is a transfer syntax UID to propose (storescu's -x options), for compressed files.
    """
    command = ["storescu", "-R", "-aet", calling, "-aec", called]
    if propose:
        command.append(STORESCU_PROPOSE[propose])
    if verbose:
        command.append("-v")
    command += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def echoscu(port: int, *, calling: str = "ECHOSCU", called: str = "QCGATE") -> subprocess.CompletedProcess[str]:
    command = ["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=dcmtk_env())


def send_raw_c_store(port: int, payload: bytes, *, sop_class: str = CT_IMAGE_STORAGE,
                     sop_instance: str = "1.2.3.4.5.6.7", transfer_syntax: str = EXPLICIT_VR_LE) -> int | None:
    """Send ``payload`` as the data set of one C-STORE, byte for byte, with pynetdicom.

    Malformed files cannot go through storescu (it refuses to read them). pynetdicom's chunked
    send streams whatever follows a file's meta header without decoding it, so the payload is
    wrapped in a valid meta header and sent that way. Returns the DIMSE status, or None if no
    response came back.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import _config

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    with tempfile.NamedTemporaryFile(suffix=".dcm", delete=False) as handle:
        handle.write(buffer.getvalue() + payload)
        path = Path(handle.name)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(sop_class, transfer_syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE")
        if not assoc.is_established:
            raise AssertionError("association for the raw C-STORE was not accepted")
        try:
            status = assoc.send_c_store(path)
            return int(status.Status) if status is not None and "Status" in status else None
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        path.unlink(missing_ok=True)


def dataset_bytes_without_meta(path: Path) -> bytes:
    """The data set part of a file: everything after preamble and File Meta, or the whole file."""
    from pydicom.filereader import _read_file_meta_info

    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return raw
    stream = io.BytesIO(raw)
    stream.seek(132)
    _read_file_meta_info(stream)
    return raw[stream.tell():]


def synthetic_ct_volume(n_slices: int, size: int, seed: int = 0) -> np.ndarray:
    """A SYNTHETIC chest-like HU volume: body ellipse, two lungs, a round lesion, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.48) ** 2 < 1
    lungs = (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.3) / 0.14) ** 2 < 1) | (((yy - 0.5) / 0.3) ** 2 + ((xx - 0.7) / 0.14) ** 2 < 1)
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs] = -850.0
    volume = np.repeat(plane[np.newaxis], n_slices, axis=0)
    for k in range(n_slices):
        radius = 0.05 * (1 - abs(k - n_slices / 2) / (n_slices / 2 + 1))
        lesion = ((yy - 0.45) ** 2 + (xx - 0.3) ** 2) < radius**2
        volume[k][lesion] = -300.0
    return volume + rng.normal(0, 15, volume.shape)


def write_synthetic_case(out_dir: Path, *, n_slices: int = 12, size: int = 128, seed: int = 0,
                         patient_id: str = "SYNTH001") -> tuple[list[Path], Path]:
    """Write a SYNTHETIC CT series and one BINARY SEG of its lesion; returns (CT files, SEG file)."""
    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    volume = synthetic_ct_volume(n_slices, size, seed)
    ct_dir = out_dir / "ct"
    datasets = write_ct_series(volume, (0.7, 0.7), 2.5, ct_dir, patient_id=patient_id)
    masks = (volume > -500) & (volume < -100)
    seg_path = out_dir / "seg.dcm"
    write_seg(datasets, masks, seg_path, algorithm_name="TestAI", manufacturer="qcgate tests")
    return sorted(ct_dir.glob("*.dcm")), seg_path


def write_seg_for_real_ct(ct_files: Sequence[Path], out_path: Path, threshold_hu: float = 300.0) -> Path:
    """A SEG (made by the test, over real CT) of the pixels above ``threshold_hu``."""
    from qcgate.phantom.dicom_export import write_seg

    datasets = [pydicom.dcmread(path) for path in ct_files]
    for ds in datasets:  # anonymised real CT lacks type 2 patient attributes highdicom copies
        for keyword in ("PatientBirthDate", "PatientSex", "PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDate", "StudyTime"):
            if keyword not in ds:
                setattr(ds, keyword, "")
    masks = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) > threshold_hu for ds in datasets])
    write_seg(datasets, masks, out_path, algorithm_name="ThresholdTest", manufacturer="qcgate tests",
              series_description="test SEG over real CT", synthetic=False)
    return out_path


def read_dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


PYRADIOMICS_CASES = SHARED / "data" / "pyradiomics-testcases"


def write_lung2_case(out_dir: Path) -> tuple[list[Path], list[Path]]:
    """The real lung2 chest CT (pyradiomics test case) as a DICOM CT series, plus a two-member
    FRACTIONAL ensemble derived from its one-reader lesion label (members: the label blurred, and
    the label dilated by one pixel then blurred; they disagree at the border, as real models do).
    Returns (CT files, member SEG files)."""
    import SimpleITK as sitk
    from scipy import ndimage

    from qcgate.phantom.dicom_export import write_ct_series, write_seg

    image = sitk.ReadImage(str(PYRADIOMICS_CASES / "lung2_image.nrrd"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(PYRADIOMICS_CASES / "lung2_label.nrrd"))) > 0
    volume = sitk.GetArrayFromImage(image).astype(np.float64)
    spacing = image.GetSpacing()
    datasets = write_ct_series(volume, (spacing[1], spacing[0]), spacing[2], out_dir / "ct", patient_id="LUNG2",
                               patient_name="TESTCASE^LUNG2", series_description="lung2 test case (real CT, pyradiomics data)",
                               synthetic=False)
    first = np.stack([ndimage.gaussian_filter(s.astype(float), 1.2) for s in label]).clip(0, 1)
    dilated = np.stack([ndimage.binary_dilation(s, iterations=1) for s in label])
    second = np.stack([ndimage.gaussian_filter(s.astype(float), 1.2) for s in dilated]).clip(0, 1)
    members = []
    for number, probabilities in enumerate((first, second), start=1):
        path = out_dir / f"member{number}.dcm"
        write_seg(datasets, probabilities, path, fractional=True, algorithm_name=f"DerivedMember{number}",
                  manufacturer="qcgate tests", series_description=f"ensemble member {number} derived from the lung2 label",
                  synthetic=False, series_number=200 + number)
        members.append(path)
    return sorted((out_dir / "ct").glob("*.dcm")), members


def write_phantom_case(out_dir: Path, seed: int = 3, members: int = 2) -> tuple[list[Path], list[Path]]:
    """A SYNTHETIC phantom case as DICOM: (CT files, AI member SEG files)."""
    from qcgate.phantom.generator import PhantomConfig, generate_cohort, write_cohort_dicom

    cohort = generate_cohort(PhantomConfig(patients=1, seed=seed, members=members), workers=1)
    write_cohort_dicom(cohort, out_dir)
    case_dir = next(p for p in out_dir.iterdir() if p.is_dir())
    return sorted((case_dir / "ct").glob("*.dcm")), sorted(case_dir.glob("seg_ai_member*.dcm"))


class StoreSCP:
    """DCMTK storescp as the destination PACS; files are written in arrival order (-od)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(self.folder), str(self.port)],
                                        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def received(self) -> list[Dataset]:
        """What arrived, read whole, in file-name order."""
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def received_in_order(self) -> list[str]:
        """SOP Instance UIDs in arrival order."""
        files = sorted((p for p in self.folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
        return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def wait_until(predicate: Callable[[], Any], timeout: float = 240, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
