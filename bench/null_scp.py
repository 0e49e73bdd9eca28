"""The library floor for bench_ingest.py: a pynetdicom Storage SCP that receives like qcgate
(chunked to a temporary file, 4 MiB max PDU) and acknowledges without storing or checking anything.

    python bench/null_scp.py PORT
"""

from __future__ import annotations

import sys

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage

_config.STORE_RECV_CHUNKED_DATASET = True


def main() -> None:
    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 4_194_304
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


if __name__ == "__main__":
    main()
