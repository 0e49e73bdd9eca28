"""The coding scheme: standard codes mean what we say, every private code is documented."""

from __future__ import annotations

import re

from pydicom.sr.coding import Code

from qcgate.core.results import Verdict
from qcgate.writers import codes as qc_codes
from tests.support import REPO

DOC = REPO / "docs" / "CODING_SCHEME.md"


def _private_codes() -> list[Code]:
    found = [value for value in vars(qc_codes).values() if isinstance(value, Code) and value.scheme_designator == qc_codes.PRIVATE_SCHEME]
    found += list(qc_codes.Q_SOURCE_CODES.values())
    found += [qc_codes.uncertainty_code(name)[0] for name in qc_codes._UM_MEANINGS]
    return found


def test_every_private_code_is_documented_with_its_meaning() -> None:
    rows = {match.group(1): match.group(2).strip() for match in re.finditer(r"^\| `([^`]+)` \| ([^|]+)\|", DOC.read_text(), re.M)}
    codes = _private_codes()
    assert len(codes) > 20
    for code in codes:
        assert code.value in rows, f"{code.value} missing from {DOC.name}"
        assert rows[code.value] == code.meaning
        assert len(code.value) <= 16


def test_private_code_values_are_unique() -> None:
    values = [code.value for code in _private_codes()]
    assert len(values) == len(set(values))


def test_verdict_codes_are_the_standard_quality_assessment_values() -> None:
    # the meanings come from pydicom's DCM dictionary, not from our own strings
    assert (qc_codes.QUALITY_ASSESSMENT.value, qc_codes.QUALITY_ASSESSMENT.meaning) == ("111050", "Quality Assessment")
    # review is "needs review" in our scheme (issue 10): DCM 111236 read like a failure in a worklist
    assert {v: (c.scheme_designator, c.value) for v, c in qc_codes.VERDICT_CODES.items()} == {
        Verdict.ACCEPT: ("DCM", "111237"), Verdict.REVIEW: (qc_codes.PRIVATE_SCHEME, "NEEDSREVIEW"),
        Verdict.REJECT: ("DCM", "111235")}
    assert qc_codes.VERDICT_CODES[Verdict.REVIEW].meaning == "Needs review"
    for verdict, code in qc_codes.VERDICT_CODES.items():
        assert qc_codes.verdict_from_code(code.value, code.scheme_designator) is verdict
        assert qc_codes.verdict_from_code(code.value) is verdict
    assert qc_codes.verdict_from_code("111236", "DCM") is Verdict.REVIEW  # SRs of earlier versions still read


def test_unknown_uncertainty_metric_gets_a_stable_short_code() -> None:
    first, unit = qc_codes.uncertainty_code("um_some_future_metric_with_a_long_name")
    again, _ = qc_codes.uncertainty_code("um_some_future_metric_with_a_long_name")
    assert first == again and len(first.value) <= 16 and unit.value == "1"
    assert qc_codes.uncertainty_name("UM_MEAN") == "um_mean"
