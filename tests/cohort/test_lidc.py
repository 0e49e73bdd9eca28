"""The LIDC-layout adapter: the real set, and directories laid out like it with bad content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qcgate.cohort import is_lidc_dir, load_cohort, load_lidc
from qcgate.errors import InputError

LIDC_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "lidc"


def test_real_lidc_subset_loads_with_geometry_only() -> None:
    assert is_lidc_dir(LIDC_DIR)
    cohort = load_cohort(LIDC_DIR, max_patients=5)
    assert len(cohort.patients) == 5 and not cohort.has_images and not cohort.has_reader_identity
    records = {r["key"]: r for r in json.loads((LIDC_DIR / "lidc_meta.json").read_text())}
    for case in cohort:
        record = records[case.case_id]
        assert 2 <= record["n_annotators"] <= 4
        assert len(case.reader_masks) == record["n_annotators"]
        readers, rows, cols, slices = record["shape"]
        assert case.shape == (slices, rows, cols)
        assert case.offset == (record["bbox"][0][0], record["bbox"][1][0])
        assert case.frame_shape == (512, 512)
        assert case.lesion_slices()


def _copy_layout(tmp_path: Path, keys: int = 3) -> tuple[Path, list[dict]]:
    records = [r for r in json.loads((LIDC_DIR / "lidc_meta.json").read_text()) if r["n_annotators"] == 4][:keys]
    records += [r for r in json.loads((LIDC_DIR / "lidc_meta.json").read_text()) if r["n_annotators"] > 4][:1]
    with np.load(LIDC_DIR / "lidc_masks_packed.npz") as archive:
        arrays = {r["key"]: archive[r["key"]] for r in records}
    target = tmp_path / "lidc_copy"
    target.mkdir()
    (target / "lidc_meta.json").write_text(json.dumps(records))
    np.savez_compressed(target / "lidc_masks_packed.npz", **arrays)
    return target, records


def test_any_directory_laid_out_like_lidc_loads_and_skips_clustering_errors(tmp_path: Path) -> None:
    target, records = _copy_layout(tmp_path)
    cohort = load_cohort(target)
    assert len(cohort) == 3  # the > 4-annotator cluster is skipped
    assert any("annotators" in message for message in cohort.skipped)


def test_lidc_bad_inputs_are_named(tmp_path: Path) -> None:
    target, records = _copy_layout(tmp_path)
    # packed bits that do not fit the recorded shape
    broken = [dict(r) for r in records]
    broken[0]["shape"] = [4, 99, 99, 9]
    (target / "lidc_meta.json").write_text(json.dumps(broken))
    with pytest.raises(InputError, match=rf"{records[0]['key']}.*bits"):
        load_lidc(target)
    (target / "lidc_meta.json").write_text("[{]")
    with pytest.raises(InputError, match="lidc_meta.json: not valid JSON"):
        load_lidc(target)
    (target / "lidc_meta.json").write_text(json.dumps([{"key": "x"}]))
    with pytest.raises(InputError, match="record 0 lacks patient_id"):
        load_lidc(target)
    (target / "lidc_masks_packed.npz").unlink()
    with pytest.raises(InputError, match="lidc_masks_packed.npz: file not found"):
        load_lidc(target)
    shutil.rmtree(target)
    with pytest.raises(InputError, match="not a directory"):
        load_lidc(target)
