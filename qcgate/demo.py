"""`qcgate demo`: the whole product on loopback in one command, on SYNTHETIC data.

It generates a synthetic chest CT case with a two-member AI ensemble (`qcgate phantom`), starts the
gate (SQLite, local workers) and a stand-in PACS (a pynetdicom Storage SCP), sends the case by
C-STORE, waits for the verdicts, and checks that the QC SEG and SR reached the PACS.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from qcgate.config import load_settings
from qcgate.errors import QcgateError

LOG = logging.getLogger("qcgate.demo")
MARKER = "QCGATE-DEMO-DIRECTORY"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_pacs(folder: Path, port: int):  # type: ignore[no-untyped-def]
    """A minimal PACS: stores whatever it receives under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(folder / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title="DEMO_PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _send(files: list[Path], port: int) -> None:
    import pydicom

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title="DEMO_AI")
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCGATE")
    if not assoc.is_established:
        raise QcgateError("the gate refused the demo association")
    try:
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            if status is None or int(status.Status) != 0:
                raise QcgateError(f"the gate did not store {dataset.SOPInstanceUID}: {status}")
    finally:
        assoc.release()


def run_demo(out: Path, *, seed: int, model: str, timeout: float) -> int:
    from qcgate.phantom.generator import (
        PhantomConfig,
        generate_cohort,
        write_cohort_dicom,
    )
    from qcgate.service import GateService
    from qcgate.store.models import (
        Case,
        CaseState,
        Delivery,
        DeliveryState,
        Output,
    )

    if out.exists():
        if not (out / MARKER).exists():
            raise QcgateError(f"{out} exists and is not a demo directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by `qcgate demo`; SYNTHETIC data only; safe to delete\n")

    print(f"1/5 generating a SYNTHETIC case (seed {seed}) ...", flush=True)
    cohort = generate_cohort(PhantomConfig(patients=1, seed=seed, members=2), workers=1)
    write_cohort_dicom(cohort, out / "input")
    case_dir = next((out / "input").iterdir())
    files = sorted((case_dir / "ct").glob("*.dcm")) + sorted(case_dir.glob("seg_ai_member*.dcm"))

    pacs_port, gate_port = _free_port(), _free_port()
    print(f"2/5 starting a stand-in PACS on 127.0.0.1:{pacs_port} and the gate on 127.0.0.1:{gate_port} ...", flush=True)
    pacs = _start_pacs(out / "pacs", pacs_port)
    settings = load_settings(None, {
        "node": {"port": gate_port},
        "storage": {"data_dir": str(out / "gate"), "min_free_mb": 50},
        "assembly": {"stable_seconds": 1.0, "poll_interval_seconds": 0.2},
        "pipeline": {"model": model, "workers": 1},
        "delivery": {"destinations": [f"DEMO_PACS@127.0.0.1:{pacs_port}"], "poll_interval_seconds": 0.2,
                     "backoff_base_seconds": 1.0},
    })
    service = GateService(settings)
    service.start()
    try:
        print(f"3/5 sending {len(files)} instances (CT + {len(files) - len(list((case_dir / 'ct').glob('*.dcm')))} AI SEGs) by C-STORE ...", flush=True)
        _send(files, gate_port)
        print("4/5 waiting for the QC job and the delivery ...", flush=True)
        deadline = time.monotonic() + timeout
        while True:
            with service.session_factory() as session:
                case = session.scalars(select(Case)).first()
                pending = session.scalars(select(Delivery).where(Delivery.state == DeliveryState.PENDING.value)).all()
                delivered = session.scalars(select(Delivery).where(Delivery.state == DeliveryState.SENT.value)).all()
            if case is not None and case.state == CaseState.FAILED.value:
                raise QcgateError(f"the QC job failed: {case.reason}")
            if case is not None and case.state == CaseState.DONE.value and delivered and not pending:
                break
            if time.monotonic() > deadline:
                raise QcgateError(f"no result within {timeout:.0f} s (case state: {case.state if case else 'none'})")
            time.sleep(0.5)
        with service.session_factory() as session:
            from qcgate.core.layout import DataLayout
            from qcgate.store.queries import case_detail

            detail = case_detail(session, case.id, spool_root=DataLayout(settings.storage.data_dir).spool)
            rows = detail["slices"] if detail else []
            outputs = session.scalars(select(Output)).all()
        print("5/5 result")
        print(f"  series verdict: {case.series_verdict.upper()}  (model {case.model_name} {case.model_version}, q from {case.q_source})")
        print(f"  {'CT image':>8}  {'z mm':>7}  {'tau':>6}  {'q':>6}  verdict")
        for row in rows:
            q = "   -  " if row["q"] is None else f"{row['q']:6.3f}"
            number = "?" if row["instance_number"] is None else row["instance_number"]
            z = "      -" if row["z_mm"] is None else f"{row['z_mm']:7.1f}"
            print(f"  {number:>8}  {z}  {row['tau']:6.3f}  {q}  {row['verdict']}")
        for output in outputs:
            print(f"  {output.kind:>6}: {settings.storage.data_dir / output.path}")
        received = sorted((out / "pacs").glob("*.dcm"))
        print(f"  the PACS received {len(received)} object(s): {', '.join(p.name.split('-')[0] for p in received)}")
        print(f"  audit: qcgate audit cases --data-dir {settings.storage.data_dir}")
        return 0
    finally:
        service.stop()
        pacs.shutdown()
