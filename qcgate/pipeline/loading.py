"""Load a case from the spool: the CT series in HU, and each SEG member as probabilities on its grid.

Anything that cannot be processed raises :class:`JobFailure` with a reason a person can act on;
the job is then failed with that reason instead of crashing or retrying forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as decode_pixels

from qcgate.core.dicom import CT_IMAGE_STORAGE

LESION_PROPERTY_CODES = {"52988006", "49755003", "4147007"}  # SCT lesion, morphologically abnormal structure, mass
POSITION_TOLERANCE_MM = 0.05


class JobFailure(Exception):
    """A deterministic reason why a case cannot be processed (retrying will not help)."""


@dataclass
class CtSeries:
    """A CT series sorted along its slice normal (works for gantry tilt and uneven spacing)."""

    datasets: list[Dataset]
    hu: np.ndarray  # (slices, rows, cols): int16 when HU are integers, else float32
    pixel_spacing: tuple[float, float]
    frame_of_reference_uid: str
    positions_mm: np.ndarray  # (slices, 3) ImagePositionPatient

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


@dataclass
class SegMember:
    """One SEG of the case: the lesion segment's probability on every CT slice."""

    dataset: Dataset
    probability: np.ndarray  # (slices, rows, cols) float16 in [0, 1] (half the memory; ample precision)
    is_reference_reader: bool  # a MANUAL segmentation: a reader, not an ensemble member
    label: str


def load_ct_series(paths: Sequence[Path]) -> CtSeries:
    """Read, check and sort the CT slices; pixel data is decoded here (pylibjpeg for compressed)."""
    datasets: list[Dataset] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if str(ds.SOPClassUID) != CT_IMAGE_STORAGE:
            # The node refuses Enhanced CT by default ([node] accept_enhanced_ct = false).
            raise JobFailure(f"{ds.SOPClassUID} (e.g. Enhanced CT) is stored but not yet processed by the worker; "
                             "the node accepts it only with [node] accept_enhanced_ct = true")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise JobFailure("multi-frame CT images are not processed by the worker")
        datasets.append(ds)
    if not datasets:
        raise JobFailure("the case has no CT images")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise JobFailure(f"CT slices differ in size: {sorted(shapes)}")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise JobFailure("CT slices differ in orientation")
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames) != 1:
        raise JobFailure("CT slices belong to different frames of reference")
    spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets}
    if len(spacings) != 1:
        raise JobFailure(f"CT slices differ in pixel spacing: {sorted(spacings)}")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    if len(order) > 1 and np.min(np.diff(distance[order])) < 1e-3:
        raise JobFailure("two CT slices share one position along the slice normal")
    datasets = [datasets[i] for i in order]
    slopes = {float(ds.get("RescaleSlope", 1) or 1) for ds in datasets}
    intercepts = {float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets}
    # Integer HU (the usual slope 1) fit int16 at half the memory of float32.
    integral = slopes == {1.0} and all(float(i).is_integer() for i in intercepts)
    hu = np.empty((len(datasets), *shapes.pop()), np.int16 if integral else np.float32)
    try:
        for k, ds in enumerate(datasets):
            # pixel_array(ds) decodes without caching the array on the dataset (pydicom's property does).
            stored = decode_pixels(ds).astype(np.float32)
            values = stored * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
            hu[k] = np.clip(values, -32768, 32767) if integral else values
    except Exception as exc:  # any decoder failure is a property of the data
        raise JobFailure(f"CT pixel data cannot be decoded: {type(exc).__name__}: {exc}") from None
    return CtSeries(
        datasets=datasets,
        hu=hu,
        pixel_spacing=tuple(float(v) for v in datasets[0].PixelSpacing),  # type: ignore[arg-type]
        frame_of_reference_uid=frames.pop(),
        positions_mm=positions[order],
    )


def choose_lesion_segment(seg: hd.seg.Segmentation, labels: Sequence[str]) -> tuple[int, str] | None:
    """The lesion segment: the only segment, else one whose label contains a configured word,
    else one whose segmented property type is a lesion concept. None when there is none."""
    descriptions = list(seg.SegmentSequence)
    if len(descriptions) == 1:
        item = descriptions[0]
        return int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
    wanted = [label.lower() for label in labels]
    for item in descriptions:
        if any(word in str(item.get("SegmentLabel", "")).lower() for word in wanted):
            return int(item.SegmentNumber), str(item.SegmentLabel)
    for item in descriptions:
        codes = item.get("SegmentedPropertyTypeCodeSequence", [])
        if any(str(code.CodeValue) in LESION_PROPERTY_CODES for code in codes):
            return int(item.SegmentNumber), str(item.get("SegmentLabel", ""))
    return None


def _frames_by_position(seg: hd.seg.Segmentation, segment_number: int, ct: CtSeries) -> np.ndarray:
    """Fallback mapping when a SEG lacks source image references: match frame positions to slices."""
    probability = np.zeros(ct.hu.shape, dtype=np.float32)
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[np.newaxis]
    scale = float(seg.get("MaximumFractionalValue", 1) or 1) if seg.SegmentationType == "FRACTIONAL" else 1.0
    for frame_index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number != segment_number:
            continue
        position = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(ct.positions_mm - position, axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] > POSITION_TOLERANCE_MM:
            raise JobFailure("SEG frames cannot be mapped onto the CT: a frame lies at no CT slice position")
        probability[nearest] = np.maximum(probability[nearest], pixels[frame_index].astype(np.float32) / scale)
    return probability


def load_seg_member(path: Path, ct: CtSeries, labels: Sequence[str]) -> SegMember | None:
    """Map one SEG's lesion segment onto the CT slices; None when it has no lesion segment."""
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise JobFailure(f"SEG {path.name} cannot be read: {type(exc).__name__}: {exc}") from None
    if str(seg.get("FrameOfReferenceUID", ct.frame_of_reference_uid)) != ct.frame_of_reference_uid:
        raise JobFailure("SEG frames cannot be mapped onto the CT: another frame of reference")
    if (int(seg.Rows), int(seg.Columns)) != ct.hu.shape[1:]:
        raise JobFailure(f"SEG frames cannot be mapped onto the CT: grid {seg.Rows}x{seg.Columns} is not {ct.hu.shape[1]}x{ct.hu.shape[2]}")
    chosen = choose_lesion_segment(seg, labels)
    if chosen is None:
        return None
    segment_number, label = chosen
    try:
        pixels = seg.get_pixels_by_source_instance(
            ct.sop_instance_uids,
            segment_numbers=[segment_number],
            assert_missing_frames_are_empty=True,
            rescale_fractional=True,
            dtype=np.float32,
        )
        probability = np.asarray(pixels[..., 0], dtype=np.float32)
    except (ValueError, KeyError, AttributeError, RuntimeError):
        probability = _frames_by_position(seg, segment_number, ct)
    algorithm_types = {str(item.get("SegmentAlgorithmType", "")) for item in seg.SegmentSequence if int(item.SegmentNumber) == segment_number}
    return SegMember(
        dataset=seg,
        probability=np.clip(probability, 0.0, 1.0).astype(np.float16),
        is_reference_reader=algorithm_types == {"MANUAL"},
        label=label,
    )
