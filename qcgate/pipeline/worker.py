"""One QC job: a ready case becomes per-slice verdicts, a QC SEG, a TID 1500 SR and a report.

Runs in a worker process of the dispatcher's executor. Everything it decides is committed in one
final transaction (slice results, outputs, outbox rows, job done), so a crash mid-job leaves no
half-recorded result: the job simply runs again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qcgate.config import PipelineSettings, Settings
from qcgate.core.layout import DataLayout
from qcgate.core.dicom import SEGMENTATION_STORAGE
from qcgate.pipeline.loading import CtSeries, JobFailure, SegMember, SparseSlices, load_ct_series, load_seg_member
from qcgate.core.results import CaseResult, SliceResult, Verdict, slice_verdict
from qcgate.predictors import ThresholdModel, ThresholdPredictor
from qcgate.store.database import create_db_engine, make_session_factory
from qcgate.store.models import (
    Case,
    CaseState,
    Instance,
    Job,
    JobState,
    Output,
    SliceResultRecord,
    utcnow,
)

LOG = logging.getLogger("qcgate.worker")


@dataclass
class StageTimer:
    """Wall time per stage, for the audit row and the benchmark's breakdown."""

    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._start, 4)
        self._start = now


def series_verdict(verdicts: list[Verdict], settings: PipelineSettings) -> tuple[Verdict, str]:
    """The series verdict and the policy that produced it, stated in words."""
    if not verdicts:
        return Verdict.REVIEW, "no lesion slice was segmented: a reviewer must confirm the empty result"
    n_reject = sum(v is Verdict.REJECT for v in verdicts)
    n_review = sum(v is Verdict.REVIEW for v in verdicts)
    if settings.series_policy == "fraction":
        policy = (f"reject if more than {settings.reject_fraction:.0%} of lesion slices are rejected; "
                  "otherwise review if any slice is rejected or needs review; otherwise accept")
        if n_reject / len(verdicts) > settings.reject_fraction:
            return Verdict.REJECT, policy
    else:
        policy = "reject if any lesion slice is rejected; otherwise review if any needs review; otherwise accept"
        if n_reject:
            return Verdict.REJECT, policy
    if n_reject or n_review:
        return Verdict.REVIEW, policy
    return Verdict.ACCEPT, policy


ASSESS_CHUNK = 25  # lesion slices assessed per model call (bounds the inputs held at once)


def _occupied_slices(probability: Any) -> list[int]:
    """The slices where a member's probability is non-zero (a sparse member knows them)."""
    if hasattr(probability, "occupied"):
        return list(probability.occupied())
    return [int(k) for k in np.flatnonzero(np.asarray(probability).reshape(len(probability), -1).max(axis=1) > 0)]


def _members_on_slice(ensemble: list[SegMember], k: int) -> tuple[tuple[int, int], np.ndarray]:
    """The members' probabilities on slice ``k`` as (members, rows, cols) float32, and where that box
    lies: the union of the sparse members' non-zero boxes (mean and std are per pixel, and both are
    0 outside it), else the whole slice."""
    if all(isinstance(m.probability, SparseSlices) for m in ensemble):
        boxes = [b for b in (m.probability.box(k) for m in ensemble) if b is not None]
        if boxes:
            box = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
            return (box[0], box[2]), np.stack([m.probability.region(k, box) for m in ensemble])
    return (0, 0), np.stack([np.asarray(m.probability[k]).astype(np.float32) for m in ensemble])


def judge_case(ct: CtSeries, members: list[SegMember], settings: PipelineSettings, model: ThresholdPredictor,
               timer: StageTimer) -> CaseResult:
    """Per-slice tau, q and verdict from the CT and the SEG members (the method of DESIGN §2)."""
    from qcgate.features import lung_mask_from_hu
    from qcgate.features.uncertainty import uncertainty_metrics
    from qcgate.predictors import SliceInput

    ensemble = [m for m in members if not m.is_reference_reader] or members
    references = [m for m in members if m.is_reference_reader and m not in ensemble]
    notes: list[str] = []
    # Mean, std and consensus only where some member sees something (most slices of a series are
    # empty): held per occupied slice (float16 maps), so memory follows the lesion, not the series.
    occupied = sorted(set().union(*(_occupied_slices(m.probability) for m in ensemble)))
    shape = tuple(ensemble[0].probability.shape)
    mean = SparseSlices(shape)  # float16, each slice cropped to its non-zero box
    uncertainty = SparseSlices(shape) if len(ensemble) >= 2 else None
    consensus: dict[int, np.ndarray] = {}
    for k in occupied:
        at, stacked = _members_on_slice(ensemble, k)
        mean.put(k, stacked.mean(axis=0), at)
        if uncertainty is not None:
            uncertainty.put(k, stacked.std(axis=0), at)
        consensus[k] = mean[k] >= 0.5
    if uncertainty is None:
        notes.append("one ensemble member: no uncertainty map; thresholds from the model without uncertainty metrics")
    use_uncertainty = uncertainty is not None and model.has_uncertainty_variant
    if len(ensemble) < 2 and not references:
        notes.append("one member: q from the model's q estimator (no ensemble agreement)")
    lesion_slices = [k for k in occupied if consensus[k].any()]
    timer.lap("ensemble")

    # One pass: each slice's features are extracted once and give tau, the key features and the
    # learned q's geometry. The inputs (float32 image, probability, uncertainty and lung mask: ~3.3 MB
    # a 512x512 slice) are built and assessed ASSESS_CHUNK slices at a time, so they never all exist at once.
    assessments = []
    lung_found = False
    for start in range(0, len(lesion_slices), ASSESS_CHUNK):
        inputs = []
        for k in lesion_slices[start:start + ASSESS_CHUNK]:
            image = ct.hu[k].astype(np.float32)
            lung = lung_mask_from_hu(image)
            if not lung.any():
                notes.append(f"slice {k}: no lung found; the imaging group falls back to its defaults (healthy-lung "
                             "descriptors undefined)")
            else:
                lung_found = True
            inputs.append(SliceInput(image_hu=image, ai_probability=mean[k].astype(np.float32),
                                     uncertainty_map=None if uncertainty is None else uncertainty[k].astype(np.float32),
                                     pixel_spacing=ct.pixel_spacing, lung_mask=lung))
        assessments += model.assess(inputs, use_uncertainty=use_uncertainty, top=5)
        del inputs
    timer.lap("thresholds")

    # q on tau's scale from the model's q estimator (or a reference reader), with its band.
    from qcgate.pipeline.quality_gate import domain_problems, slice_quality, synthetic_warning

    taus = [float(np.clip(a.tau, 0.0, 1.0)) for a in assessments]
    quality = slice_quality(model, ensemble, references, mean, lesion_slices, ct, taus, settings,
                            float(model.validation_mae_for(use_uncertainty)),
                            extracted=[a.features for a in assessments])
    notes.extend(quality.notes)
    reasons = list(quality.review_reasons)
    domain = domain_problems(ct, model, lung_found, lesion_slices) if lesion_slices else []
    if domain:
        reasons.extend(f"out of the model's domain: {p}" for p in domain)
        notes.extend(f"out of the model's domain: {p}; every slice goes to review" for p in domain)
    warning = synthetic_warning(model)
    if warning:
        notes.insert(0, warning)
    pixel_area = ct.pixel_spacing[0] * ct.pixel_spacing[1]
    slices: list[SliceResult] = []
    for position, k in enumerate(lesion_slices):
        q = quality.q[position]
        tau = taus[position]
        metrics = None
        uncertainty_map = None if uncertainty is None else uncertainty[k].astype(np.float32)
        if uncertainty_map is not None:
            metrics = {name.removeprefix("uncertainty."): float(value)
                       for name, value in uncertainty_metrics(uncertainty_map, consensus[k]).items()}
        verdict = Verdict.REVIEW if domain else slice_verdict(tau, q, quality.margin_accept, quality.margin_reject)
        slices.append(SliceResult(
            source_image=ct.datasets[k], slice_index=k, ai_mask=consensus[k], tau=tau, q=q,
            margin=quality.margin_accept, verdict=verdict, lesion_area_mm2=float(consensus[k].sum() * pixel_area),
            uncertainty=metrics, key_features=assessments[position].key_features,
            uncertainty_map=uncertainty_map, margin_reject=quality.margin_reject, reason="; ".join(reasons),
            q_source=quality.q_source,
        ))
    verdict, policy = series_verdict([s.verdict for s in slices], settings)
    timer.lap("verdicts")
    return CaseResult(
        ct_datasets=ct.datasets, slices=slices, series_verdict=verdict, series_policy=policy,
        model_name=str(model.name), model_version=str(model.version), q_source=quality.q_source,
        n_members=len(ensemble), uses_uncertainty=use_uncertainty, notes=notes,
        segmentation_datasets=[m.dataset for m in members], q_validation_mae=quality.q_validation_mae,
        verdict_rule=quality.rule, synthetic_model=bool(getattr(model, "synthetic", False)), reasons=reasons,
    )


def write_case_outputs(result: CaseResult, out_dir: Path, settings: PipelineSettings, image_hu: np.ndarray | None = None,
                       timer: StageTimer | None = None) -> dict[str, tuple[Path, Dataset | None]]:
    """Write the QC SEG (when there is a lesion), the SR, the HTML report and, when configured, the
    Parametric Map, the Secondary Capture series and the Encapsulated PDF; {kind: (path, dataset)}.

    The SC series has one entry per instance, kinds "sc.1" (the summary), "sc.2", ... (outputs are
    unique per job and kind; the routable object type is the part before the dot, see
    ``qcgate.writers.sc.output_object_type``). The source headers are prepared once for all writers;
    each dataset is kept as built (no read-back); the τ/q plot is rendered once for HTML and PDF."""
    from qcgate.writers.common import prepare_derivation_sources, save_dataset
    from qcgate.writers.seg import build_qc_seg
    from qcgate.writers.sr import build_qc_sr

    def lap(stage: str) -> None:
        if timer is not None:
            timer.lap(stage)

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = prepare_derivation_sources(result)
    outputs: dict[str, tuple[Path, Dataset | None]] = {}
    seg_dataset = None
    if result.slices:
        seg_dataset = build_qc_seg(result, sources=sources)
        outputs["seg"] = (save_dataset(seg_dataset, out_dir / "qc-seg.dcm"), seg_dataset)
    lap("write_seg")
    if settings.write_uncertainty_map:
        from qcgate.writers.pmap import build_qc_pmap, has_uncertainty_map

        if has_uncertainty_map(result):
            pmap = build_qc_pmap(result, sources=sources)
            outputs["pmap"] = (save_dataset(pmap, out_dir / "qc-uncertainty-pmap.dcm"), pmap)
            lap("write_pmap")
    sr = build_qc_sr(result, seg_dataset, sources=sources)
    outputs["sr"] = (save_dataset(sr, out_dir / "qc-sr.dcm"), sr)
    lap("write_sr")
    # The threshold model's SYNTHETIC flag (its manifest) is not in CaseResult: ask the loaded model.
    model_synthetic = False
    if settings.write_report or settings.write_pdf or settings.write_secondary_capture:
        try:
            model_synthetic = bool(getattr(load_threshold_model(settings.model), "synthetic", False))
        except Exception:  # noqa: BLE001 - a model that cannot be named here only loses the banner's model half
            LOG.warning("model %s: could not read its synthetic flag; banners follow the data only", settings.model)
    if settings.write_secondary_capture:
        from qcgate.writers.sc import build_qc_sc_series, sc_file_name, sc_output_kind

        for sc in build_qc_sc_series(result, image_hu, sources=sources, model_synthetic=model_synthetic):
            number = int(sc.InstanceNumber)
            outputs[sc_output_kind(number)] = (save_dataset(sc, out_dir / "sc" / sc_file_name(number)), sc)
        lap("write_sc")
    plot_png = None
    if (settings.write_report or settings.write_pdf) and len(result.slices) >= 2:
        from qcgate.report.content import tau_q_plot_png

        plot_png = tau_q_plot_png(result)
    if settings.write_report:
        from qcgate.report.html import write_case_report

        outputs["report"] = (write_case_report(result, out_dir / "report.html", image_hu, model_synthetic=model_synthetic,
                                               plot_png=plot_png), None)
        lap("write_report")
    if settings.write_pdf:
        from qcgate.report.pdf import render_case_pdf
        from qcgate.writers.pdf import build_qc_pdf

        document = render_case_pdf(result, image_hu, model_synthetic=model_synthetic, plot_png=plot_png)
        pdf = build_qc_pdf(result, document, sources=sources, model_synthetic=model_synthetic)
        outputs["pdf"] = (save_dataset(pdf, out_dir / "qc-report-pdf.dcm"), pdf)
        lap("write_pdf")
    return outputs


def _record_success(session: Session, job: Job, case: Case, result: CaseResult, outputs: dict[str, tuple[Path, Dataset | None]],
                    data_dir: Path, destinations: list[str], timer: StageTimer) -> None:
    for item in result.slices:
        session.add(SliceResultRecord(
            case_id=case.id, job_id=job.id, sop_instance_uid=str(item.source_image.SOPInstanceUID),
            slice_index=item.slice_index, tau=item.tau, q=item.q, margin=_finite(item.margin), verdict=item.verdict.value,
            q_source=item.q_source, margin_reject=None if item.margin_reject is None else _finite(item.margin_reject), review_reason=item.reason or None,
            lesion_area_mm2=item.lesion_area_mm2,
            um_mean=(item.uncertainty or {}).get("um_mean"), um_p90=(item.uncertainty or {}).get("um_p90"),
            key_features=json.dumps(item.key_features) if item.key_features else None,
        ))
    for kind, (path, dataset) in outputs.items():
        output = Output(case_id=case.id, job_id=job.id, kind=kind, path=str(path.relative_to(data_dir)),
                        sop_class_uid=str(dataset.SOPClassUID) if dataset is not None else None,
                        sop_instance_uid=str(dataset.SOPInstanceUID) if dataset is not None else None)
        session.add(output)  # its delivery rows: serve's router (qcgate.delivery.routing); ``destinations`` is unused
    case.state = CaseState.DONE.value
    case.series_verdict = result.series_verdict.value
    case.model_name, case.model_version = result.model_name, result.model_version
    case.q_source, case.n_members, case.uses_uncertainty = result.q_source, result.n_members, result.uses_uncertainty
    audit = list(result.notes)
    if result.verdict_rule:
        audit.append(f"verdict rule: {result.verdict_rule}")
    if result.synthetic_model and not any("SYNTHETIC" in n for n in audit):
        audit.insert(0, f"SYNTHETIC model {result.model_name} {result.model_version}")
    case.notes = "; ".join(audit) or None
    case.processed_at = utcnow()
    case.reason = None
    job.state = JobState.DONE.value
    job.finished_at = utcnow()
    job.error = None
    job.timings = json.dumps(timer.seconds)


def _finite(value: float | None) -> float:
    """The audit row's margin column is a number: an impossible accept (infinite margin) is stored as 1.0
    (q >= tau + 1 cannot happen for tau > 0); the rule in words is in the case notes."""
    if value is None or not np.isfinite(value):
        return 1.0
    return float(value)


def _owns(job: Job | None, token: str | None) -> bool:
    """True while ``job`` is running under this worker's claim token."""
    return job is not None and job.state == JobState.RUNNING.value and (token is None or job.worker == token)


def _record_failure(session: Session, job_id: int, reason: str, token: str | None) -> None:
    job = session.get(Job, job_id, with_for_update=True)
    if not _owns(job, token):
        LOG.warning("job %s: no longer ours (re-claimed or finished elsewhere); failure not recorded", job_id)
        return
    job.state = JobState.FAILED.value
    job.finished_at = utcnow()
    job.error = reason[:4000]
    session.execute(update(Case).where(Case.id == job.case_id).values(state=CaseState.FAILED.value, reason=reason[:4000]))


_MODEL_CACHE: dict[str, tuple[str, ThresholdModel]] = {}  # name or path -> (manifest stamp, model)
MODEL_LOADS: dict[str, int] = {}  # name or path -> loads in this process (tests, diagnostics)


def _manifest_stamp(name_or_path: str) -> str:
    """The sha256 of the model's manifest.json, "" when it cannot be read (loading then names the problem).

    The manifest lists the sha256 of every other file of the model, so a retrained or replaced model
    has a new manifest: hashing the one small file per job is enough to notice it."""
    from qcgate.predictors.artifacts import MANIFEST, resolve_model_directory, sha256_file

    try:
        return sha256_file(resolve_model_directory(name_or_path) / MANIFEST)
    except Exception:  # a bad name or a missing manifest: load_model raises the stated error
        return ""


def load_threshold_model(name_or_path: str) -> ThresholdModel:
    """The configured model, kept loaded in the worker process across jobs (loading checks hashes);
    loaded again when its manifest changes (a retrained or replaced model)."""
    stamp = _manifest_stamp(name_or_path)
    cached = _MODEL_CACHE.get(name_or_path)
    if cached is not None and stamp and cached[0] == stamp:
        return cached[1]
    from qcgate.predictors import load_model, load_named_model

    path = Path(name_or_path)
    model = load_model(path) if path.is_dir() else load_named_model(name_or_path)
    MODEL_LOADS[name_or_path] = MODEL_LOADS.get(name_or_path, 0) + 1
    if cached is not None:
        LOG.info("model %s changed (manifest sha256 %s… -> %s…): loaded again", name_or_path, cached[0][:12], stamp[:12])
    _MODEL_CACHE[name_or_path] = (stamp, model)
    return model


def run_qc_job(job_id: int, settings_json: str, token: str | None = None) -> dict[str, Any]:
    """Executor entry point: run job ``job_id`` to done or failed; returns a small summary.

    ``token`` is the dispatcher's claim; results are recorded only while the job still carries it."""
    settings = Settings.model_validate_json(settings_json)
    engine = create_db_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    data_dir = settings.storage.data_dir.resolve()
    timer = StageTimer()
    try:
        return _run(job_id, settings, session_factory, data_dir, timer, token)
    finally:
        engine.dispose()


def _run(job_id: int, settings: Settings, session_factory: Any, data_dir: Path, timer: StageTimer, token: str | None) -> dict[str, Any]:
    try:
        with session_factory() as session:
            job = session.get(Job, job_id)
            if not _owns(job, token):
                return {"job_id": job_id, "state": "not-owner"}
            case_id = job.case_id
            rows = session.execute(select(Instance.sop_class_uid, Instance.spool_path).where(Instance.case_id == case_id)).all()
        layout = DataLayout(data_dir)
        spool = layout.spool
        ct_paths = [spool / path for sop_class, path in rows if sop_class != str(SEGMENTATION_STORAGE)]
        seg_paths = [spool / path for sop_class, path in rows if sop_class == str(SEGMENTATION_STORAGE)]
        ct = load_ct_series(ct_paths)
        timer.lap("load_ct")
        members = [m for m in (load_seg_member(p, ct, settings.pipeline.lesion_segment_labels) for p in seg_paths) if m is not None]
        if not members:
            raise JobFailure("no SEG of the case has a lesion segment (by label or segmented property type)")
        timer.lap("load_seg")
        model = load_threshold_model(settings.pipeline.model)
        timer.lap("load_model")
        result = judge_case(ct, members, settings.pipeline, model, timer)
        outputs = write_case_outputs(result, layout.case_outputs(case_id), settings.pipeline, ct.hu, timer)
        with session_factory() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            case = session.get(Case, case_id)
            if not _owns(job, token) or case is None:
                LOG.warning("job %s: no longer ours (re-claimed or finished elsewhere); result discarded", job_id)
                return {"job_id": job_id, "state": "not-owner"}
            _record_success(session, job, case, result, outputs, data_dir, settings.delivery.destinations, timer)
        LOG.info("job %s done: case %s %s, %d lesion slices", job_id, case_id, result.series_verdict.value, len(result.slices))
        return {"job_id": job_id, "state": "done", "verdict": result.series_verdict.value, "timings": timer.seconds}
    except JobFailure as exc:
        reason = str(exc)
        LOG.warning("job %s failed: %s", job_id, reason)
    except MemoryError:  # past pipeline.job_memory_limit_mb (RLIMIT_AS, set by qcgate.pipeline.lifeline)
        reason = f"exceeded the memory limit of {settings.pipeline.job_memory_limit_mb} MB"
        LOG.warning("job %s failed: %s", job_id, reason)
    except Exception as exc:  # an unexpected error must not leave the job running forever
        reason = f"internal error: {type(exc).__name__}: {exc}"
        LOG.error("job %s failed: %s\n%s", job_id, reason, traceback.format_exc())
    with session_factory() as session, session.begin():
        _record_failure(session, job_id, reason, token)
    return {"job_id": job_id, "state": "failed", "error": reason}


def worker_identity() -> str:
    """A claim token: host, dispatcher pid and a random part, unique per claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
