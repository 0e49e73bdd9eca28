"""Coded concepts of the qcgate outputs: standard codes where they exist, a private scheme for the rest.

Standard concepts (verified against ``pydicom.sr.codedict.codes``):

* DCM 111050 "Quality Assessment" carries the verdict: accept -> DCM 111237 "Usable - Meets the
  quality control standard" and reject -> DCM 111235 "Unusable - Quality renders image unusable" (CID
  6044); review -> 99QCGATE NEEDSREVIEW "Needs review", because the closest standard value (DCM 111236
  "Usable - Does not meet the quality control standard") reads as a failure in a worklist while review
  means "not shown either way: a person decides". SRs written before this change carry DCM 111236 for
  review; ``verdict_from_code`` still reads it. The subject of the assessment is the AI segmentation on that slice (the measurement
  group's subject), not the CT image itself; docs/CODING_SCHEME.md states the mapping.
* DCM 111051 "Quality Control Standard" = DCM 111240 "Institutionally defined quality control standard"
  says whose standard the verdict applies (the site's configured margin and policy).
* SCT 42798000 "Area" in UCUM "mm2" for the lesion area; UCUM "1" for ratios (tau, q, margin, UM
  statistics); DCM 114010 "Value unknown" when q cannot be estimated.

Everything else lives in the private coding scheme ``99QCGATE`` (``PRIVATE_SCHEME``), each code documented
in docs/CODING_SCHEME.md. Private code values are short mnemonics (SH, at most 16 characters).
"""

from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from qcgate.core.results import Verdict

#: Private coding scheme designator ("99" prefix: a local scheme, PS3.16 section 8.2).
PRIVATE_SCHEME = "99QCGATE"
PRIVATE_SCHEME_NAME = "qcgate quality-gate concepts"
PRIVATE_SCHEME_RESPONSIBLE = "qcgate project (docs/CODING_SCHEME.md)"


def _private(value: str, meaning: str) -> Code:
    return Code(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- standard concepts -----------------------------------------------------------------------------
QUALITY_ASSESSMENT = codes.DCM.QualityAssessment  # DCM 111050
QC_MEETS_STANDARD = codes.DCM.UsableMeetsTheQualityControlStandard  # DCM 111237
QC_BELOW_STANDARD = codes.DCM.UsableDoesNotMeetTheQualityControlStandard  # DCM 111236 (read only: older SRs)
QC_UNUSABLE = codes.DCM.UnusableQualityRendersImageUnusable  # DCM 111235
QUALITY_CONTROL_STANDARD = codes.DCM.QualityControlStandard  # DCM 111051
INSTITUTIONAL_QC_STANDARD = codes.DCM.InstitutionallyDefinedQualityControlStandard  # DCM 111240
VALUE_UNKNOWN = codes.DCM.ValueUnknown  # DCM 114010
AREA = codes.SCT.Area  # SCT 42798000
YES = codes.SCT.Yes
NO = codes.SCT.No
COMMENT = codes.DCM.Comment  # DCM 121106
LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
LESION_TYPE = codes.SCT.Lesion  # SCT 52988006
PROCEDURE_CT = codes.LN.CTUnspecifiedBodyRegion  # LN 25045-6

UNIT_MM = codes.UCUM.Millimeter  # UCUM "mm"
UNIT_RATIO = codes.UCUM.NoUnits  # UCUM "1"
UNIT_MM2 = codes.UCUM.SquareMillimeter  # UCUM "mm2"
UNIT_BIT = Code("bit", "UCUM", "bit")
UNIT_SLICES = Code("{slices}", "UCUM", "slices")
UNIT_MEMBERS = Code("{members}", "UCUM", "ensemble members")

#: "review": a person decides (not a failure), a value of DCM 111050 in the private scheme.
NEEDS_REVIEW = _private("NEEDSREVIEW", "Needs review")

#: The verdict as a value of DCM 111050 "Quality Assessment".
VERDICT_CODES: dict[Verdict, Code] = {
    Verdict.ACCEPT: QC_MEETS_STANDARD,
    Verdict.REVIEW: NEEDS_REVIEW,
    Verdict.REJECT: QC_UNUSABLE,
}

#: Values read back as a verdict that qcgate no longer writes (SRs of earlier versions).
_LEGACY_VERDICT_CODES: dict[tuple[str, str], Verdict] = {("DCM", QC_BELOW_STANDARD.value): Verdict.REVIEW}


def verdict_from_code(value: str, scheme_designator: str | None = None) -> Verdict:
    """The verdict a Quality Assessment value stands for (inverse of ``VERDICT_CODES``; also reads
    DCM 111236, which earlier versions wrote for review). ``scheme_designator`` None: any scheme."""
    for verdict, code in VERDICT_CODES.items():
        if code.value == value and scheme_designator in (None, code.scheme_designator):
            return verdict
    for (scheme, legacy_value), verdict in _LEGACY_VERDICT_CODES.items():
        if legacy_value == value and scheme_designator in (None, scheme):
            return verdict
    raise KeyError(f"({scheme_designator}, {value}) is not a qcgate verdict code")


# --- private concepts ------------------------------------------------------------------------------
TAU = _private("TAU", "Image-specific threshold (predicted DSC Lesion)")
Q_ESTIMATE = _private("QEST", "Estimated segmentation quality (Dice)")
MARGIN = _private("MARGIN", "Verdict margin")  # the accept margin: accept if q >= tau + MARGIN
MARGIN_REJECT = _private("MARGINREJ", "Verdict reject margin")  # reject if q < tau - MARGINREJ
Q_VALIDATION_MAE = _private("QMAE", "Validation mean absolute error of the quality estimate")
VERDICT_RULE = _private("RULE", "Verdict rule")
SYNTHETIC_MODEL = _private("SYNTHMODEL", "Threshold model trained on synthetic data")
SERIES_QC_FINDING = _private("SERIESQC", "Series segmentation quality control summary")
SERIES_POLICY = _private("POLICY", "Series verdict policy")
QC_METHOD = _private("QCGATE", "qcgate image-specific threshold quality gate")
SLICES_ACCEPTED = _private("NACCEPT", "Number of lesion slices accepted")
SLICES_REVIEW = _private("NREVIEW", "Number of lesion slices for review")
SLICES_REJECTED = _private("NREJECT", "Number of lesion slices rejected")
ENSEMBLE_MEMBERS = _private("NMEMBERS", "Number of ensemble members")
Q_SOURCE = _private("QSOURCE", "Source of the quality estimate")
UNCERTAINTY_USED = _private("UMUSED", "Uncertainty map used")
UNCERTAINTY_MAP = _private("UMAP", "Ensemble uncertainty map (pixel-wise standard deviation)")
# The one slice numbering of every output: the CT's InstanceNumber, with its position beside it.
INSTANCE_NUMBER = _private("INSTNUM", "Source image Instance Number")
SLICE_POSITION = _private("SLICEZ", "Source image position along the patient z axis")
QC_SEG_SEGMENT = _private("QCSEGSEG", "QC SEG segment of the slice verdict")

#: Values of ``Q_SOURCE`` (the strings CaseResult.q_source takes).
Q_SOURCE_CODES: dict[str, Code] = {
    "ensemble-agreement": _private("QSRC-ENSEMBLE", "Ensemble agreement"),
    "reference": _private("QSRC-REFERENCE", "Reference reader segmentation"),
    "regressor": _private("QSRC-REGRESSOR", "Site-trained quality regressor"),
    "probability": _private("QSRC-PROBABILITY", "Soft Dice of the calibrated probability map"),
    "learned": _private("QSRC-LEARNED", "Learned quality regressor (mask and probability)"),
    "learned-um": _private("QSRC-LEARNED-UM", "Learned quality regressor (mask, probability, uncertainty)"),
    "learned-mask": _private("QSRC-LEARN-MASK", "Learned quality regressor (mask only)"),
    "learned-margin": _private("QSRC-LEARN-MARG", "Learned margin regressor (AI Dice minus expert agreement)"),
    "none": _private("QSRC-NONE", "No quality estimate available"),
}
#: A q source this version does not know (its name then goes into a Comment of the summary).
Q_SOURCE_OTHER = _private("QSRC-OTHER", "Other quality estimate source")

#: UM statistics (qcgate.features.uncertainty names) -> (code, unit).
_UM_MEANINGS: dict[str, tuple[str, Code]] = {
    "um_mean": ("Mean of the uncertainty map near the lesion", UNIT_RATIO),
    "um_std": ("Standard deviation of the uncertainty map near the lesion", UNIT_RATIO),
    "um_entropy": ("Histogram entropy of the uncertainty map near the lesion", UNIT_BIT),
    "um_p50": ("50th percentile of the uncertainty map near the lesion", UNIT_RATIO),
    "um_p90": ("90th percentile of the uncertainty map near the lesion", UNIT_RATIO),
    "um_p99": ("99th percentile of the uncertainty map near the lesion", UNIT_RATIO),
    "um_frac_gt_0p1": ("Fraction of the lesion region with uncertainty above 0.1", UNIT_RATIO),
    "um_frac_gt_0p2": ("Fraction of the lesion region with uncertainty above 0.2", UNIT_RATIO),
    "um_frac_gt_0p3": ("Fraction of the lesion region with uncertainty above 0.3", UNIT_RATIO),
}


def uncertainty_code(name: str) -> tuple[Code, Code]:
    """(concept, unit) for the UM statistic ``name`` (e.g. "um_mean" -> 99QCGATE "UM_MEAN").

    Names not in the documented table still get a stable private code (so a new metric never breaks
    the writer): the upper-cased name when it fits in 16 characters, else "UM" plus a hash.
    """
    meaning, unit = _UM_MEANINGS.get(name, (f"Uncertainty statistic {name}", UNIT_RATIO))
    value = name.upper()
    if len(value) > 16:
        value = "UM" + hashlib.sha1(name.encode()).hexdigest()[:14].upper()
    return _private(value, meaning[:64]), unit


def uncertainty_name(code_value: str) -> str | None:
    """The UM statistic name behind a private code value (for documented names), else None."""
    for name in _UM_MEANINGS:
        if name.upper() == code_value:
            return name
    return None


def coding_scheme_identification() -> Dataset:
    """An item of CodingSchemeIdentificationSequence (0008,0110) declaring the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_RESPONSIBLE
    return item
