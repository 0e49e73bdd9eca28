"""The library floor for bench_ingest.py: a pynetdicom Storage SCP that receives like qcgate
(chunked to a temporary file, 4 MiB max PDU) and acknowledges without storing or checking anything.

    python bench/null_scp.py PORT [--tuned]

``--tuned``: with qcgate's reactors (``pynetdicom_adapter.install_reactors``: waits instead of
1 ms polling sleeps, 256 KiB socket reads), the floor qcgate itself runs on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage

_config.STORE_RECV_CHUNKED_DATASET = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--tuned", action="store_true")
    args = parser.parse_args()
    if args.tuned:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from qcgate.node import pynetdicom_adapter

        if not pynetdicom_adapter.install_reactors():
            raise SystemExit("the tuned reactors do not fit this pynetdicom version")
    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 4_194_304
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.start_server(("127.0.0.1", args.port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


if __name__ == "__main__":
    main()
