"""The optional Parametric Map of the ensemble uncertainty map (pixel-wise std of the members).

32-bit float frames on the source CT grid, one per lesion slice that has an uncertainty map (the
CaseResult carries the map only for lesion slices, so other slices get no frame rather than an
invented zero map). The real world value mapping is the identity, quantity 99QCGATE UMAP, unit
UCUM "1" (the std of probabilities in [0, 1] lies in [0, 0.5]).

Without any uncertainty map (one member) there is nothing to write: ``write_qc_pmap`` raises
``NoUncertaintyMapError`` and the SR says the UM was not used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from qcgate import __version__
from qcgate.errors import InputError
from qcgate.core.results import CaseResult
from qcgate.writers import codes as qc_codes
from qcgate.writers.common import DerivationSources, is_synthetic_source, save_dataset, source_headers_for_derivation

log = logging.getLogger(__name__)

QC_PMAP_SERIES_NUMBER = 9003
QC_PMAP_SERIES_DESCRIPTION = "QC uncertainty map: AI ensemble std (qcgate)"


class NoUncertaintyMapError(InputError):
    """No lesion slice carries an uncertainty map (one member): no Parametric Map to write."""


def has_uncertainty_map(result: CaseResult) -> bool:
    """Whether any lesion slice carries an uncertainty map, i.e. whether a Parametric Map can be written."""
    return any(item.uncertainty_map is not None for item in result.slices)


def build_qc_pmap(result: CaseResult, *, series_number: int = QC_PMAP_SERIES_NUMBER,
                  sources: DerivationSources | None = None) -> hd.pm.ParametricMap:
    """The uncertainty Parametric Map as a highdicom dataset; ``write_qc_pmap`` saves it.

    ``sources``: the headers prepared once per job (``prepare_derivation_sources``); else prepared here."""
    items = sorted((item for item in result.slices if item.uncertainty_map is not None), key=lambda s: s.slice_index)
    if not items:
        raise NoUncertaintyMapError("QC Parametric Map: no slice has an uncertainty map")
    headers = sources.ct if sources is not None else source_headers_for_derivation(result.ct_datasets)
    prepared = {str(ds.SOPInstanceUID): ds for ds in headers}
    chosen = []
    for item in items:
        uid = str(item.source_image.SOPInstanceUID)
        if uid not in prepared:
            raise InputError(f"QC Parametric Map: slice {item.slice_index} references an image that is not in the CT series")
        chosen.append(prepared[uid])
    # highdicom requires frame i to belong to source_images[i]: sort and keep maps with their sources.
    sorted_sources = hd.spatial.sort_datasets(chosen)
    map_of_uid = {str(item.source_image.SOPInstanceUID): np.asarray(item.uncertainty_map, dtype=np.float32) for item in items}
    shape = (int(sorted_sources[0].Rows), int(sorted_sources[0].Columns))
    frames = []
    for ds in sorted_sources:
        frame = map_of_uid[str(ds.SOPInstanceUID)]
        if frame.shape != shape or not np.all(np.isfinite(frame)):
            raise InputError(f"QC Parametric Map: uncertainty map of {ds.SOPInstanceUID} is not a finite {shape} array")
        frames.append(frame)
    pixel_array = np.stack(frames)
    low, high = float(pixel_array.min()), float(pixel_array.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="UM_STD",
        lut_explanation="Ensemble pixel-wise standard deviation",
        unit=qc_codes.UNIT_RATIO,
        value_range=(low, high if high > low else low + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=qc_codes.UNCERTAINTY_MAP,
    )
    synthetic = is_synthetic_source(sorted_sources)
    pmap = hd.pm.ParametricMap(
        source_images=sorted_sources,
        pixel_array=pixel_array,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="qcgate",
        manufacturer_model_name="qcgate",
        software_versions=__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # The std lies in [0, 0.5]: a window narrower than 1 needs LINEAR_EXACT (dciodvfy checks it).
        voi_lut_transformations=[hd.content.VOILUTTransformation(
            window_center=0.25, window_width=0.5, window_explanation="uncertainty 0 to 0.5",
            voi_lut_function="LINEAR_EXACT",
        )],
        content_description=f"Ensemble uncertainty, {result.n_members} members"[:64],
        content_label="QC_UNCERTAINTY",
    )
    # dciodvfy evaluates the GeneralSeries Laterality condition as required here; type 2: empty is allowed.
    if "Laterality" not in pmap:
        pmap.Laterality = ""
    pmap.SeriesDescription = (("SYNTHETIC " if synthetic else "") + QC_PMAP_SERIES_DESCRIPTION)[:64]
    pmap.CodingSchemeIdentificationSequence = [qc_codes.coding_scheme_identification()]
    return pmap


def write_qc_pmap(result: CaseResult, out_path: Path) -> Path:
    """Write the uncertainty Parametric Map of ``result`` to ``out_path`` and return the path.

    Raises NoUncertaintyMapError when no slice has an uncertainty map (``has_uncertainty_map``).
    """
    pmap = build_qc_pmap(result)
    out_path = save_dataset(pmap, out_path)
    log.info("wrote QC Parametric Map with %d frame(s) to %s", int(pmap.NumberOfFrames), out_path)
    return out_path
