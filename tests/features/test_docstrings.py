"""pyradiomics habit: every public descriptor function documents its formula in its docstring."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import qcgate.features
from qcgate.features.radiomics_features import FEATURE_CLASSES, class_feature_names

#: Modules whose public functions compute descriptors (or regions/metrics that define them).
DESCRIPTOR_MODULES = (
    "qcgate.features.geometry",
    "qcgate.features.intensity",
    "qcgate.features.wavelets",
    "qcgate.features.uncertainty",
    "qcgate.features.regions",
    "qcgate.features.lung",
    "qcgate.features.position",
    "qcgate.features.radiomics_numpy",
)
#: A formula: an equation, a sum/product/root, or set algebra on masks.
FORMULA = re.compile(r"=|Σ|√|∖|⊕|⊖|argmax|log")


def public_functions(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(obj) and obj.__module__ == module_name:
            found.append((name, obj))
        elif inspect.isclass(obj) and obj.__module__ == module_name:
            for method_name, method in vars(obj).items():
                method = getattr(method, "__func__", method)
                if not method_name.startswith("_") and inspect.isfunction(method):
                    found.append((f"{name}.{method_name}", method))
    return found


ALL_FUNCTIONS = [(m, n, f) for m in DESCRIPTOR_MODULES for n, f in public_functions(m)]
SERIALISATION = {"PositionFrequencyMap.to_json", "PositionFrequencyMap.from_json", "PositionFrequencyMap.save",
                 "PositionFrequencyMap.load", "bounding_box", "region_crop", "place_in_frame"}


def test_the_modules_have_public_functions() -> None:
    assert len(ALL_FUNCTIONS) >= 30


@pytest.mark.parametrize(("module", "name", "function"), ALL_FUNCTIONS, ids=[f"{m}:{n}" for m, n, _ in ALL_FUNCTIONS])
def test_public_function_documents_its_formula(module: str, name: str, function: object) -> None:
    doc = inspect.getdoc(function)
    assert doc and len(doc) > 20, f"{module}.{name} has no docstring"
    if name not in SERIALISATION:
        assert FORMULA.search(doc), f"{module}.{name}: docstring states no formula"


def test_every_radiomics_feature_has_a_docstring() -> None:
    for class_name, feature_class in FEATURE_CLASSES.items():
        for feature in class_feature_names(class_name):
            doc = getattr(feature_class, f"get{feature}FeatureValue").__doc__
            assert doc and doc.strip(), f"{class_name}.{feature}"


def test_contract_functions_are_documented() -> None:
    for function in (qcgate.features.extract_slice_features, qcgate.features.feature_names):
        assert inspect.getdoc(function)
