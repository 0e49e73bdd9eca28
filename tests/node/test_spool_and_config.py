"""Unit tests: spool path safety and atomic writes; settings validation and flag overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcgate.config import load_settings
from qcgate.errors import ConfigError
from qcgate.node.scp import host_is_allowed
from qcgate.node.spool import Spool, safe_uid_component


@pytest.mark.parametrize("uid", ["..", "../../etc/passwd", "/abs", "1.2/3", "a" * 65, "", "1..2", "1.2.\x00", "C:\\x"])
def test_unsafe_uids_become_hashed_names(uid: str) -> None:
    name = safe_uid_component(uid)
    assert name.startswith("x-") and len(name) == 34 and "/" not in name and "." not in name


def test_valid_uids_are_kept_readable() -> None:
    assert safe_uid_component("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"


def test_spool_paths_never_leave_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    relative = spool.relative_path_for("../../..", "/etc", "../../x")
    assert spool.absolute(relative).is_relative_to(spool.root)
    with pytest.raises(ValueError):
        spool.absolute("../outside.dcm")


def test_commit_is_an_atomic_rename_of_an_fsynced_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    incoming = spool.write_incoming(b"DICM payload")
    final = spool.commit(incoming, Path("1/2/3.dcm"))
    assert final.read_bytes() == b"DICM payload" and not incoming.exists()
    assert spool.purge_incoming() == 0
    spool.write_incoming(b"partial")
    assert spool.purge_incoming() == 1


def test_host_allow_list_accepts_addresses_networks_and_names() -> None:
    assert host_is_allowed("127.0.0.1", [])
    assert host_is_allowed("10.1.2.3", ["10.0.0.0/8"])
    assert host_is_allowed("192.168.1.5", ["192.168.1.5"])
    assert not host_is_allowed("127.0.0.1", ["10.0.0.0/8", "pacs.example"])


def test_bad_keys_and_values_are_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nport = 70000\nae_title = "WAY_TOO_LONG_AE_TITLE"\n[assembly]\nstable_secnds = 3\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "node.port" in message and "node.ae_title" in message and "assembly.stable_secnds: unknown key" in message


def test_not_toml_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "absent.toml")


def test_flags_override_the_file_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "qcgate.toml"
    config.parent.mkdir()
    config.write_text('[node]\nport = 4242\n[storage]\ndata_dir = "../state"\n')
    settings = load_settings(config, {"node": {"port": 5000, "ae_title": None}})
    assert settings.node.port == 5000 and settings.node.ae_title == "QCGATE"
    assert settings.storage.data_dir == (tmp_path / "state").resolve()
    assert settings.database_url.endswith("state/qcgate.db")


def test_check_config_command_exits_non_zero_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[storage]\nmin_free_mb = -1\n")
    result = subprocess.run([sys.executable, "-m", "qcgate.cli", "check-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "storage.min_free_mb" in result.stderr and "Traceback" not in result.stderr


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "qcgate.example.toml"
    settings = load_settings(example)
    assert settings.node.ae_title == "QCGATE"
