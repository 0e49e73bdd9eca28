"""The deploy kit: install.sh into a clean fake root, the unit under `systemd-analyze verify`,
the example configuration (valid, and documenting every key)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from qcgate.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
EXAMPLE = REPO / "deploy" / "qcgate.example.toml"
UNIT = REPO / "systemd" / "qcgate.service"


def _install(root: Path) -> subprocess.CompletedProcess[str]:
    # --no-deps: the test checks the layout, not pip's resolver (the dependencies are large); the
    # package itself is still built and installed from the checkout.
    return subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-user", "--no-systemctl", "--pip-args", "--no-deps"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fakeroot")
    result = _install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.mark.slow  # deploy: runs deploy/install.sh into a temporary root
def test_install_creates_the_expected_tree(installed_root: Path) -> None:
    root = installed_root
    config = root / "etc/qcgate/qcgate.toml"
    assert config.read_text() == EXAMPLE.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # the config may hold a database password
    assert stat.S_IMODE((root / "var/lib/qcgate").stat().st_mode) == 0o750
    assert os.access(root / "opt/qcgate/venv/bin/qcgate", os.X_OK)
    assert (root / "opt/qcgate/models/lidc-geometry").is_dir()
    site = next((root / "opt/qcgate/venv/lib").glob("python3.11/site-packages"))
    assert (site / "qcgate/store/migrations/versions/0003_audit_indexes.py").is_file()  # migrations ship with the package
    unit = (root / "etc/systemd/system/qcgate.service").read_text()
    assert f"ExecStart={root}/opt/qcgate/venv/bin/qcgate serve --config {root}/etc/qcgate/qcgate.toml" in unit
    assert f"QCGATE_MODELS_DIR={root}/opt/qcgate/models" in unit
    assert not (REPO / "build").exists() or "build" in (REPO / ".gitignore").read_text()


@pytest.mark.slow  # deploy: runs deploy/install.sh into a temporary root
def test_install_again_keeps_the_operators_config(installed_root: Path) -> None:
    config = installed_root / "etc/qcgate/qcgate.toml"
    config.write_text(config.read_text().replace('ae_title = "QCGATE"', 'ae_title = "SITEGATE"', 1))
    result = _install(installed_root)
    assert result.returncode == 0, result.stderr
    assert 'ae_title = "SITEGATE"' in config.read_text()
    assert (installed_root / "etc/qcgate/qcgate.toml.example").read_text() == EXAMPLE.read_text()


@pytest.mark.slow  # deploy: runs deploy/install.sh into a temporary root
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_installed_units_pass_systemd_analyze_verify(installed_root: Path) -> None:
    units = [installed_root / "etc/systemd/system" / name for name in ("qcgate.service", "qcgate-retention.service", "qcgate-retention.timer")]
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_repository_unit_complains_only_about_the_absent_executable() -> None:
    """On a machine without /opt/qcgate, the only findings are the missing ExecStart* binary."""
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    findings = [line for line in result.stderr.splitlines() if line.strip()]
    if Path("/opt/qcgate/venv/bin/qcgate").exists():
        assert result.returncode == 0, result.stderr
        return
    assert findings and all("/opt/qcgate/venv/bin/qcgate is not executable" in line for line in findings), result.stderr


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_example_config_validates_and_documents_every_key() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.storage.data_dir == Path("/var/lib/qcgate")
    text = EXAMPLE.read_text()
    raw = tomllib.loads(text)
    documented = set()
    for section_name, section in raw.items():
        for key, value in section.items():
            if isinstance(value, dict):
                documented |= {f"{section_name}.{key}.{sub}" for sub in value}
            else:
                documented.add(f"{section_name}.{key}")
    # Keys shown commented out (no default value to show) count as documented.
    commented = {line.lstrip("# ").split(" =")[0] for line in text.splitlines() if line.startswith("# ") and " = " in line}
    missing = {key for key in _keys(Settings) if key not in documented and key.rsplit(".", 1)[-1] not in commented}
    assert not missing, f"keys missing from {EXAMPLE.name}: {sorted(missing)}"


def test_check_config_command_accepts_the_example() -> None:
    result = subprocess.run([sys.executable, "-m", "qcgate.cli", "check-config", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_orthanc_example_routes_to_the_gate_and_never_loops() -> None:
    """The Orthanc example is consistent: the gate's modality entry and port, the script's settings
    section, the loop guard (results from the gate's AE are never forwarded back), least privilege.
    (tests/orthanc runs it against a real Orthanc.)"""
    from tests.orthanc_support import DEPLOY_ORTHANC, load_orthanc_json

    config = load_orthanc_json(DEPLOY_ORTHANC / "orthanc.json")
    routing = config["QcgateRouting"]
    gate = config["DicomModalities"][routing["GateModality"]]
    lua = (DEPLOY_ORTHANC / "route-to-qcgate.lua").read_text()
    assert gate["AET"] == Settings().node.ae_title and gate["Port"] == Settings().node.port
    assert "local GATE_AET = ModalityAet(GATE_MODALITY)" in lua and "if origin == GATE_AET then" in lua
    assert "function OnStableSeries" in lua and "function OnJobFailure" in lua
    assert config["DicomAlwaysAllowStore"] is False and config["DicomCheckModalityHost"] is True
    for name, modality in config["DicomModalities"].items():
        assert modality["AllowFind"] is False and modality["AllowMove"] is False and modality["AllowGet"] is False, name
    assert config["LuaScripts"] == ["/etc/qcgate-orthanc/route-to-qcgate.lua"]


@pytest.mark.slow
def test_full_install_runs_the_installed_service_and_answers_echo(tmp_path: Path) -> None:
    """The guide's path end to end, without systemd: install with dependencies into a fake root
    (≈ 70 s), start the installed `qcgate serve` with the installed configuration (only the data
    dir and ports moved into the test's directory), and C-ECHO it with DCMTK."""
    import signal
    import time

    from tests.support import dcmtk_env, free_port

    root = tmp_path / "root"
    result = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--no-user", "--no-systemctl"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "qcgate.toml: OK" in result.stdout  # the installer validated the config with the installed code
    venv_qcgate = root / "opt/qcgate/venv/bin/qcgate"
    port = free_port()
    config = tmp_path / "qcgate.toml"
    text = (root / "etc/qcgate/qcgate.toml").read_text()
    text = text.replace('data_dir = "/var/lib/qcgate"', f'data_dir = "{tmp_path / "data"}"', 1)
    text = text.replace("port = 11112", f"port = {port}", 1).replace("port = 9464", "port = 0", 1)
    config.write_text(text)
    environment = {**os.environ, "QCGATE_MODELS_DIR": str(root / "opt/qcgate/models")}
    models = subprocess.run([str(root / "opt/qcgate/venv/bin/python"), "-c",
                             "from qcgate.predictors import load_named_model; load_named_model('lidc-geometry')"],
                            capture_output=True, text=True, timeout=120, env=environment)
    assert models.returncode == 0, models.stderr  # the unit's QCGATE_MODELS_DIR finds the installed models
    log = tmp_path / "serve.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([str(venv_qcgate), "serve", "--config", str(config)], stdout=handle, stderr=subprocess.STDOUT, env=environment)
    try:
        deadline = time.monotonic() + 90
        while f"listening on 127.0.0.1:{port}" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        echo = subprocess.run(["echoscu", "-aec", "QCGATE", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60, env=dcmtk_env())
        assert echo.returncode == 0, echo.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text(errors="replace")[-2000:]
