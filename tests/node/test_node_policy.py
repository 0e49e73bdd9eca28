"""Association policy (AE titles, hosts, limits, TLS) and compressed transfer syntaxes."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support import PYDICOM_TEST_FILES, echoscu, storescu

pytestmark = pytest.mark.slow  # slow tier: real DCMTK clients and TLS against a qcgate serve process


def test_a_disallowed_calling_ae_title_is_rejected(make_gate) -> None:
    gate = make_gate(node={"allowed_calling_ae_titles": ["AI_ROUTER"]})
    assert echoscu(gate.port, calling="AI_ROUTER").returncode == 0
    refused = echoscu(gate.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout
    assert ("INTRUDER", "rejected") in gate.sql("SELECT calling_ae, outcome FROM associations")
    assert "calling AE title 'INTRUDER' is not in the allow-list" in gate.log_text()


def test_a_wrong_called_ae_title_is_rejected(gate) -> None:
    assert echoscu(gate.port, called="SOMEONE_ELSE").returncode != 0
    assert echoscu(gate.port).returncode == 0


def test_a_host_outside_the_allow_list_is_rejected(make_gate) -> None:
    gate = make_gate(node={"allowed_hosts": ["10.0.0.0/8"]})
    assert echoscu(gate.port).returncode != 0
    ((reason,),) = gate.sql("SELECT reason FROM associations")
    assert reason == "host 127.0.0.1 is not in the allow-list"


def test_associations_beyond_the_limit_are_rejected(make_gate) -> None:
    gate = make_gate(node={"max_associations": 1})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE")
    assert held.is_established
    try:
        assert echoscu(gate.port).returncode != 0
    finally:
        held.release()
    assert echoscu(gate.port).returncode == 0


# Compressed files in pydicom's test data. Only two are CT; the others are relabelled as CT
# (SOP class and the geometry a CT needs) with their encapsulated pixel data untouched, which is
# what the transfer-syntax path has to cope with.
COMPRESSED = [
    "JPEG2000.dcm",  # JPEG 2000
    "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 lossless (CT)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_RLE.dcm",  # RLE
    "image_dfl.dcm",  # deflated explicit VR
]


def _as_ct(source: Path, target: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(source)
    # Several test files derive from one image and share its SOP Instance UID.
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.2":
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.Modality = "CT"
    for keyword, value in (("ImagePositionPatient", [0, 0, 0]), ("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]),
                           ("PixelSpacing", [1, 1]), ("StudyInstanceUID", pydicom.uid.generate_uid()),
                           ("SeriesInstanceUID", pydicom.uid.generate_uid())):
        if keyword not in ds or not ds.get(keyword):
            setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return ds


def test_compressed_transfer_syntaxes_are_accepted_and_stored_as_received(gate, tmp_path: Path) -> None:
    files = []
    for name in COMPRESSED:
        original = _as_ct(PYDICOM_TEST_FILES / name, tmp_path / name)
        files.append((tmp_path / name, original))
    # One association per file: storescu -R proposes one transfer syntax per SOP class.
    colour = [(path, original) for path, original in files if original.get("SamplesPerPixel", 1) != 1]
    for path, original in files:
        result = storescu(gate.port, [path], propose=str(original.file_meta.TransferSyntaxUID))
        assert (result.returncode == 0) == ((path, original) not in colour), f"{path.name}: {result.stderr}"
    # The colour files' transfer syntaxes (JPEG baseline, lossless SV1) are negotiated and parsed,
    # but an RGB or YBR image is no CT the worker could process: refused for good, with the reason.
    refused = dict(gate.sql("SELECT sop_instance_uid, dimse_status FROM refused_instances"))
    assert colour and {str(original.SOPInstanceUID): 0xA900 for _, original in colour}.items() <= refused.items()
    files = [item for item in files if item not in colour]
    rows = dict(gate.sql("SELECT sop_instance_uid, transfer_syntax_uid FROM instances"))
    spool_paths = dict(gate.sql("SELECT sop_instance_uid, spool_path FROM instances"))
    for path, original in files:
        uid = str(original.SOPInstanceUID)
        assert rows[uid] == original.file_meta.TransferSyntaxUID, path.name
        stored = pydicom.dcmread(gate.data_dir / "spool" / spool_paths[uid])
        # Pixel data is kept encoded, byte for byte (deflate is a whole-dataset encoding).
        if original.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.1.99":
            assert stored.PixelData == original.PixelData, path.name


def _make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key, cert


def test_tls_with_client_certificates(make_gate, tmp_path: Path) -> None:
    server_key, server_cert = _make_certificate(tmp_path, "server")
    client_key, client_cert = _make_certificate(tmp_path, "client")
    gate = make_gate(start=False)
    config = gate.config_path.read_text() + (
        f'\n[node.tls]\nenabled = true\ncert_file = "{server_cert}"\nkey_file = "{server_key}"\n'
        f'ca_file = "{client_cert}"\nrequire_client_cert = true\n'
    )
    gate.config_path.write_text(config)
    gate.start()

    def tls_echo(with_client_cert: bool) -> bool:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
        if with_client_cert:
            context.load_cert_chain(str(client_cert), str(client_key))
        ae = AE(ae_title="TLSCLIENT")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gate.port, ae_title="QCGATE", tls_args=(context, "127.0.0.1"))
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return status is not None and status.Status == 0

    assert tls_echo(with_client_cert=True)
    assert not tls_echo(with_client_cert=False)
    assert echoscu(gate.port).returncode != 0  # plain DICOM is not spoken on a TLS port
