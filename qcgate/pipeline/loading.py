"""Load a case from the spool: the CT series in HU, and each SEG member as probabilities on its grid.

Memory follows the lesion, not the series: the CT headers are read and sorted, and a slice's pixels
are decoded only when a slice is asked for (:class:`SliceVolume`: the lesion slices, for the features
and the report); a SEG member decodes only its lesion segment's frames that hold any pixel and keeps
them as a sparse stack (:class:`SparseSlices`: slice index -> 2-D float16). Both still behave as the
(slices, rows, cols) arrays they stand for (``shape``, ``vol[k]``, ``np.asarray(vol)``, comparisons),
so small cases and tests can treat them as arrays; the pipeline only ever asks for single slices.

Anything that cannot be processed raises :class:`JobFailure` with a reason a person can act on;
the job is then failed with that reason instead of crashing or retrying forever.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from numpy.lib.mixins import NDArrayOperatorsMixin
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.pixels import pixel_array as decode_pixels

from qcgate.core.dicom import CT_IMAGE_STORAGE

LESION_PROPERTY_CODES = {"52988006", "49755003", "4147007"}  # SCT lesion, morphologically abnormal structure, mass
POSITION_TOLERANCE_MM = 0.05


class JobFailure(Exception):
    """A deterministic reason why a case cannot be processed (retrying will not help)."""


class _VolumeLike(NDArrayOperatorsMixin):
    """What a lazily held (slices, rows, cols) volume shares: array behaviour by materialising.

    ``vol[k]`` (an integer) is the cheap path; anything else (``np.asarray(vol)``, ``vol > 0``,
    ``vol.max()``, ``vol[a:b]``) builds the whole dense array first: for tests and small cases."""

    shape: tuple[int, int, int]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def slice(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            k = int(index)
            if not -self.shape[0] <= k < self.shape[0]:
                raise IndexError(f"slice {k} is out of range for {self.shape[0]} slices")
            return self.slice(k % self.shape[0])
        return self.dense()[index]

    def dense(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for k in range(self.shape[0]):
            out[k] = self.slice(k)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.dense()
        return array if dtype is None else array.astype(dtype)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(np.asarray(x) if isinstance(x, _VolumeLike) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name: str) -> Any:  # ndarray methods (min, max, astype, reshape, ...)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dense(), name)


class SliceVolume(_VolumeLike):
    """The CT in HU, one slice decoded from its file when asked for (``vol[k]``).

    Decoded slices are kept (most recently used first) up to ``cache_bytes``: the pipeline asks for
    the same lesion slices twice (features, then the report)."""

    def __init__(self, paths: Sequence[Path], datasets: Sequence[Dataset], rows: int, cols: int, integral: bool,
                 cache_bytes: int = 256 << 20) -> None:
        self.paths = list(paths)
        self.datasets = list(datasets)
        self.dtype = np.dtype(np.int16 if integral else np.float32)
        self.shape = (len(self.paths), rows, cols)
        self.integral = integral
        self.cache_bytes = cache_bytes
        self.decoded = 0  # slices decoded from their files (tests, diagnostics)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def slice(self, k: int) -> np.ndarray:
        cached = self._cache.get(k)
        if cached is not None:
            self._cache.move_to_end(k)
            return cached
        ds = self.datasets[k]
        try:
            # pixel_array(path) reads only what decoding needs from the file (pylibjpeg for compressed).
            stored = decode_pixels(self.paths[k]).astype(np.float32)
        except Exception as exc:  # any decoder failure is a property of the data
            raise JobFailure(f"CT pixel data cannot be decoded: {type(exc).__name__}: {exc}") from None
        if stored.shape != self.shape[1:]:
            raise JobFailure(f"CT pixel data cannot be decoded: slice {k} has {stored.shape}, not {self.shape[1:]}")
        values = stored * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        image = (np.clip(values, -32768, 32767) if self.integral else values).astype(self.dtype)
        image.flags.writeable = False  # shared by every caller (and the cache)
        self.decoded += 1
        self._cache[k] = image
        while len(self._cache) > 1 and len(self._cache) * image.nbytes > self.cache_bytes:
            self._cache.popitem(last=False)
        return image


class SparseSlices(_VolumeLike):
    """A (slices, rows, cols) float16 volume that holds only its non-empty slices, each cropped to
    the bounding box of its non-zero pixels (slice -> (row, col, 2-D crop)); ``vol[k]`` gives the
    full 2-D slice back (zeros outside the box)."""

    def __init__(self, shape: tuple[int, ...], slices: dict[int, np.ndarray] | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.dtype = np.dtype(np.float16)
        self.crops: dict[int, tuple[int, int, np.ndarray]] = {}
        for k, plane in (slices or {}).items():
            self.put(k, plane)

    def put(self, k: int, plane: np.ndarray, at: tuple[int, int] = (0, 0)) -> None:
        """Keep ``plane`` (clipped to [0, 1], as float16) at slice ``k``; an all-zero plane is not kept.

        ``at``: where ``plane``'s first pixel lies when it is a box of the slice (zeros outside it)."""
        values = np.clip(np.asarray(plane, np.float32), 0.0, 1.0).astype(np.float16)
        rows, cols = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
        if rows.size == 0:
            self.crops.pop(int(k), None)
            return
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        self.crops[int(k)] = (at[0] + r0, at[1] + c0, values[r0:r1, c0:c1].copy())

    def box(self, k: int) -> tuple[int, int, int, int] | None:
        """(row0, row1, col0, col1) of slice ``k``'s non-zero pixels, None for an empty slice."""
        held = self.crops.get(int(k))
        if held is None:
            return None
        r0, c0, crop = held
        return r0, r0 + crop.shape[0], c0, c0 + crop.shape[1]

    def region(self, k: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Slice ``k`` within ``box`` (row0, row1, col0, col1), float32, zeros where nothing is held."""
        r0, r1, c0, c1 = box
        out = np.zeros((r1 - r0, c1 - c0), np.float32)
        held = self.crops.get(int(k))
        if held is not None:
            hr, hc, crop = held
            top, left = max(hr, r0), max(hc, c0)
            bottom, right = min(hr + crop.shape[0], r1), min(hc + crop.shape[1], c1)
            if top < bottom and left < right:
                out[top - r0:bottom - r0, left - c0:right - c0] = crop[top - hr:bottom - hr, left - hc:right - hc]
        return out

    def slice(self, k: int) -> np.ndarray:
        out = np.zeros(self.shape[1:], np.float16)
        held = self.crops.get(k)
        if held is not None:
            r0, c0, crop = held
            out[r0:r0 + crop.shape[0], c0:c0 + crop.shape[1]] = crop
        return out

    def occupied(self) -> list[int]:
        """The slices with any non-zero probability, in order."""
        return sorted(self.crops)

    @property
    def nbytes(self) -> int:
        """Bytes of probability held (the occupied slices' boxes only)."""
        return sum(crop.nbytes for _, _, crop in self.crops.values())


@dataclass
class CtSeries:
    """A CT series sorted along its slice normal (works for gantry tilt and uneven spacing).

    ``datasets`` are headers (no pixel data); ``hu`` decodes a slice when it is asked for."""

    datasets: list[Dataset]
    hu: np.ndarray | SliceVolume  # (slices, rows, cols): int16 when HU are integers, else float32
    pixel_spacing: tuple[float, float]
    frame_of_reference_uid: str
    positions_mm: np.ndarray  # (slices, 3) ImagePositionPatient

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


@dataclass
class SegMember:
    """One SEG of the case: the lesion segment's probability on every CT slice (sparse: occupied slices)."""

    dataset: Dataset  # the SEG's header (its pixel data is dropped once the frames are decoded)
    probability: np.ndarray | SparseSlices  # (slices, rows, cols) float16 in [0, 1] (ample precision)
    is_reference_reader: bool  # a MANUAL segmentation: a reader, not an ensemble member
    label: str
    decoded_frames: int = 0  # frames of the SEG decoded to pixels (only the lesion segment's non-empty ones)


def load_ct_series(paths: Sequence[Path]) -> CtSeries:
    """Read, check and sort the CT headers; pixel data is decoded later, per slice asked for."""
    datasets: list[Dataset] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise JobFailure(f"CT image {Path(path).name} cannot be read: {type(exc).__name__}: {exc}") from None
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
    sorted_paths = [Path(paths[i]) for i in order]
    slopes = {float(ds.get("RescaleSlope", 1) or 1) for ds in datasets}
    intercepts = {float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets}
    # Integer HU (the usual slope 1) fit int16 at half the memory of float32.
    integral = slopes == {1.0} and all(float(i).is_integer() for i in intercepts)
    rows, cols = shapes.pop()
    return CtSeries(
        datasets=datasets,
        hu=SliceVolume(sorted_paths, datasets, rows, cols, integral),
        pixel_spacing=tuple(float(v) for v in datasets[0].PixelSpacing),  # type: ignore[arg-type]
        frame_of_reference_uid=frames.pop(),
        positions_mm=positions[order],
    )


def choose_lesion_segment(seg: Dataset, labels: Sequence[str]) -> tuple[int, str] | None:
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


def _functional_item(seg: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The first item of a functional group macro for ``frame``: per-frame, else shared."""
    for groups in (seg.get("PerFrameFunctionalGroupsSequence"), seg.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        group = groups[frame] if groups is seg.get("PerFrameFunctionalGroupsSequence") else groups[0]
        items = group.get(keyword)
        if items:
            return items[0]
    return None


def _source_uids(seg: Dataset, frame: int) -> list[str]:
    """The SOP Instance UIDs the frame was derived from (Derivation Image macro), per-frame then shared."""
    uids: list[str] = []
    for groups, per_frame in ((seg.get("PerFrameFunctionalGroupsSequence"), True),
                              (seg.get("SharedFunctionalGroupsSequence"), False)):
        if not groups:
            continue
        group = groups[frame] if per_frame else groups[0]
        for derivation in group.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if "ReferencedSOPInstanceUID" in source:
                    uids.append(str(source.ReferencedSOPInstanceUID))
        if uids:
            break
    return uids


def _frame_slices(seg: Dataset, segment_number: int, ct: CtSeries) -> dict[int, list[int]]:
    """CT slice index -> the frames of ``segment_number`` on it.

    A frame maps by its source image (Derivation Image macro); a frame without a source image in the
    CT maps by its Image Position (Patient) to a slice within POSITION_TOLERANCE_MM. A frame that maps
    by neither fails the job when the SEG names no source images at all (nothing to go on); when it
    names other images (a frame of another series) the frame is left out, as highdicom does."""
    n_frames = int(seg.get("NumberOfFrames", 1) or 1)
    index_of = {uid: k for k, uid in enumerate(ct.sop_instance_uids)}
    by_slice: dict[int, list[int]] = {}
    for frame in range(n_frames):
        identification = _functional_item(seg, frame, "SegmentIdentificationSequence")
        if identification is None or int(identification.ReferencedSegmentNumber) != segment_number:
            continue
        uids = _source_uids(seg, frame)
        slice_index = next((index_of[uid] for uid in uids if uid in index_of), None)
        if slice_index is None:
            plane = _functional_item(seg, frame, "PlanePositionSequence")
            if plane is not None and "ImagePositionPatient" in plane:
                position = np.array([float(v) for v in plane.ImagePositionPatient])
                distances = np.linalg.norm(ct.positions_mm - position, axis=1)
                nearest = int(np.argmin(distances))
                if distances[nearest] <= POSITION_TOLERANCE_MM:
                    slice_index = nearest
            if slice_index is None:
                if uids:
                    continue
                raise JobFailure("SEG frames cannot be mapped onto the CT: a frame lies at no CT slice position")
        by_slice.setdefault(slice_index, []).append(frame)
    return by_slice


def _native_frame_is_empty(seg: Dataset, frame: int) -> bool | None:
    """Whether a frame of native (uncompressed) pixel data is all zero, read from its bytes without
    decoding; None when that cannot be told from the bytes (compressed, or a 1-bit frame that does not
    start on a byte boundary)."""
    syntax = getattr(getattr(seg, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in seg or syntax is None or syntax.is_compressed:
        return None
    bits = int(seg.Rows) * int(seg.Columns) * int(seg.get("SamplesPerPixel", 1) or 1) * int(seg.BitsAllocated)
    if bits % 8:
        return None
    size = bits // 8
    data = seg.PixelData
    start = frame * size
    if start + size > len(data):
        return None
    return not np.frombuffer(data, np.uint8, count=size, offset=start).any()


def load_seg_member(path: Path, ct: CtSeries, labels: Sequence[str]) -> SegMember | None:
    """Map one SEG's lesion segment onto the CT slices; None when it has no lesion segment.

    Only the lesion segment's frames are decoded, and of those only the ones with any pixel set
    (told from the bytes of native pixel data: both BINARY and FRACTIONAL); the probabilities are
    kept for the occupied slices only."""
    try:
        seg = pydicom.dcmread(path)
        if "SegmentSequence" not in seg or str(seg.get("Modality", "")) != "SEG":
            raise ValueError("not a Segmentation (no Segment Sequence or modality SEG)")
        segmentation_type = str(seg.SegmentationType)
        if segmentation_type not in ("BINARY", "FRACTIONAL"):
            raise ValueError(f"segmentation type {segmentation_type} is not processed")
    except Exception as exc:
        raise JobFailure(f"SEG {Path(path).name} cannot be read: {type(exc).__name__}: {exc}") from None
    if str(seg.get("FrameOfReferenceUID", ct.frame_of_reference_uid)) != ct.frame_of_reference_uid:
        raise JobFailure("SEG frames cannot be mapped onto the CT: another frame of reference")
    if (int(seg.Rows), int(seg.Columns)) != tuple(ct.hu.shape[1:]):
        raise JobFailure(f"SEG frames cannot be mapped onto the CT: grid {seg.Rows}x{seg.Columns} is not {ct.hu.shape[1]}x{ct.hu.shape[2]}")
    chosen = choose_lesion_segment(seg, labels)
    if chosen is None:
        return None
    segment_number, label = chosen
    try:
        by_slice = _frame_slices(seg, segment_number, ct)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise JobFailure(f"SEG {Path(path).name} frames cannot be mapped onto the CT: {type(exc).__name__}: {exc}") from None
    scale = float(seg.get("MaximumFractionalValue", 1) or 1) if segmentation_type == "FRACTIONAL" else 1.0
    wanted = sorted(frame for frames in by_slice.values() for frame in frames
                    if _native_frame_is_empty(seg, frame) is not True)
    slice_of = {frame: k for k, frames in by_slice.items() for frame in frames}
    probability = SparseSlices(ct.hu.shape)
    try:
        for frame, pixels in zip(wanted, _decode_frames(seg, wanted)):
            k = slice_of[frame]
            values = pixels.astype(np.float32) / scale
            if k in probability.crops:  # a second frame of the segment on one slice
                values = np.maximum(probability[k].astype(np.float32), values)
            probability.put(k, values)
    except JobFailure:
        raise
    except Exception as exc:
        raise JobFailure(f"SEG {Path(path).name} pixel data cannot be decoded: {type(exc).__name__}: {exc}") from None
    algorithm_types = {str(item.get("SegmentAlgorithmType", "")) for item in seg.SegmentSequence if int(item.SegmentNumber) == segment_number}
    if "PixelData" in seg:
        del seg.PixelData  # the writers need the SEG's header only (the SR's evidence)
    return SegMember(
        dataset=seg,
        probability=probability,
        is_reference_reader=algorithm_types == {"MANUAL"},
        label=label,
        decoded_frames=len(wanted),
    )


def _decode_frames(seg: Dataset, frames: Iterable[int]) -> Iterable[np.ndarray]:
    """The pixels of ``frames`` (0-based), decoded one by one (pydicom decodes only those frames)."""
    frames = list(frames)
    if not frames:
        return []
    if int(seg.get("NumberOfFrames", 1) or 1) == 1:
        return [decode_pixels(seg)]
    return (pixels for pixels in iter_pixels(seg, indices=frames))
