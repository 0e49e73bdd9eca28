"""Model directories: hashes, feature lists, garbled weights -> a clear InputError, never a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qcgate.errors import InputError
from qcgate.predictors import load_model
from qcgate.predictors.artifacts import MANIFEST, sha256_file, write_manifest


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _rehash(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.pop("files")
    write_manifest(directory, manifest)


def test_manifest_lists_every_file_with_its_sha256(tiny_model_dir: Path) -> None:
    manifest = json.loads((tiny_model_dir / MANIFEST).read_text())
    on_disk = {p.name for p in tiny_model_dir.iterdir() if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert {"ridge.json", "ridge_uncertainty.json", "resnet.safetensors", "resnet_uncertainty.safetensors",
            "position_map.json", "MODEL_CARD.md"} <= on_disk
    for name, digest in manifest["files"].items():
        assert sha256_file(tiny_model_dir / name) == digest
    assert manifest["components"]["ridge"]["feature_names"][0].startswith("imaging.")
    assert not any(p.suffix in (".pkl", ".pt", ".pth", ".joblib") for p in tiny_model_dir.iterdir())


def test_changed_file_is_refused_with_its_name(model_copy: Path) -> None:
    ridge = model_copy / "ridge.json"
    ridge.write_text(ridge.read_text().replace('"alpha":', '"alpha": 1e9, "old_alpha":', 1))
    with pytest.raises(InputError, match=r"ridge\.json does not match its sha256"):
        load_model(model_copy)


def test_missing_file_and_missing_manifest(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "resnet.safetensors").unlink()
    with pytest.raises(InputError, match="resnet.safetensors is listed in the manifest but missing"):
        load_model(model_copy)
    with pytest.raises(InputError, match="no manifest.json"):
        load_model(tmp_path)
    with pytest.raises(InputError, match="no such model directory"):
        load_model(tmp_path / "absent")


def test_feature_list_mismatch_is_refused(model_copy: Path) -> None:
    ridge_path = model_copy / "ridge.json"
    ridge = json.loads(ridge_path.read_text())
    ridge["feature_names"][3] = "imaging.a_feature_this_code_does_not_compute"
    ridge_path.write_text(json.dumps(ridge))
    manifest = json.loads((model_copy / MANIFEST).read_text())
    manifest["components"]["ridge"]["feature_names"] = ridge["feature_names"]
    manifest.pop("files")
    write_manifest(model_copy, manifest)  # consistent hashes: only the feature list is wrong
    with pytest.raises(InputError, match="first difference at position 3.*Retrain"):
        load_model(model_copy)


def test_garbled_weights_with_a_matching_hash_are_an_input_error(model_copy: Path) -> None:
    (model_copy / "resnet.safetensors").write_bytes(b"\x00\x01 not safetensors at all")
    _rehash(model_copy)
    with pytest.raises(InputError, match="not readable ResNet weights"):
        load_model(model_copy)


def test_weights_of_another_architecture_are_an_input_error(model_copy: Path) -> None:
    manifest = json.loads((model_copy / MANIFEST).read_text())
    manifest["components"]["resnet"]["config"]["stem_width"] = 6
    manifest.pop("files")
    write_manifest(model_copy, manifest)
    with pytest.raises(InputError, match="do not fit the architecture"):
        load_model(model_copy)


def test_bad_manifest_json(model_copy: Path) -> None:
    (model_copy / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(model_copy)
