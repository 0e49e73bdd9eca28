"""Typed settings, read from a TOML file and validated; flags override the common keys.

Every key is documented in ``deploy/qcgate.example.toml``. Unknown keys are errors, not
warnings: a misspelt ``stable_secnds`` must not silently fall back to a default.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qcgate.core.dicom import AE_MAX_LENGTH
from qcgate.core.layout import DataLayout
from qcgate.errors import ConfigError

_AE_TITLE = re.compile(rf"^[\x20-\x5b\x5d-\x7e]{{1,{AE_MAX_LENGTH}}}$")  # DICOM AE VR: no backslash, ≤16 chars


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-{AE_MAX_LENGTH} printable characters, no backslash)")
    return stripped


class TlsSettings(_Section):
    """Optional TLS on the DICOM port (DICOM PS3.15 secure transport)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = Field(default=None, description="CA bundle that client certificates must chain to")
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TlsSettings":
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


class NodeSettings(_Section):
    """The DICOM listener (SCP)."""

    ae_title: str = "QCGATE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    require_called_ae_title: bool = True
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1, le=1024)
    max_pdu_bytes: int = Field(default=4_194_304, ge=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    # Off by default: the QC worker does not process Enhanced (multi-frame) CT yet; such jobs would fail.
    accept_enhanced_ct: bool = False
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class StorageSettings(_Section):
    """Where instances live on disk, and when to stop accepting them."""

    data_dir: Path = Path("var")
    min_free_mb: float = Field(default=500.0, ge=0, description="refuse C-STORE (A700) below this free space")
    fsync: bool = True
    retention_days: float = Field(default=0.0, ge=0, description="`qcgate retention run` deletes finished, delivered cases older than this; 0 keeps forever")
    retention_free_mb: float = Field(default=0.0, ge=0, description="below this free space, retention also deletes the oldest finished, delivered cases; 0: off")

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def spool_dir(self) -> Path:
        return self.layout.spool


class DatabaseSettings(_Section):
    """The audit database. Empty url means SQLite under the data dir."""

    url: str = ""


class AssemblySettings(_Section):
    """When a case (one CT series + its SEGs) is complete."""

    stable_seconds: float = Field(default=30.0, ge=0)
    incomplete_timeout_seconds: float = Field(default=3600.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _timeout_after_stable(self) -> "AssemblySettings":
        if self.incomplete_timeout_seconds < self.stable_seconds:
            raise ValueError("assembly.incomplete_timeout_seconds must be ≥ assembly.stable_seconds")
        return self


class PipelineSettings(_Section):
    """The QC jobs: which model sets the thresholds and how verdicts are reached."""

    model: str = Field(default="lidc-geometry", description="a directory under models/, or a path")
    workers: int = Field(default=1, ge=0, le=64, description="processes in the local job pool; 0: this process only queues jobs")
    job_timeout_seconds: float = Field(default=900.0, gt=0)
    max_job_attempts: int = Field(default=3, ge=1, description="a job interrupted this often is failed")
    margin: float | None = Field(default=None, ge=0, le=1, description="verdict margin with a reference reader's SEG; default tau's validation MAE")
    max_missed_bad: float = Field(default=0.10, gt=0, lt=1, description="decision band target: the largest share of "
                                  "bad AI slices accepted (class-conditional split-conformal on q - tau)")
    max_rejected_good: float = Field(default=0.10, gt=0, lt=1, description="decision band target: the largest share "
                                     "of good AI slices rejected")
    series_policy: str = Field(default="strict", description="strict | fraction")
    reject_fraction: float = Field(default=0.25, gt=0, le=1, description="for series_policy = fraction")
    lesion_segment_labels: list[str] = Field(default_factory=lambda: ["lesion"])
    write_report: bool = True
    write_uncertainty_map: bool = Field(default=False, description="also send a Parametric Map of the uncertainty map")

    @field_validator("series_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in {"strict", "fraction"}:
            raise ValueError(f"{value!r} is not one of strict, fraction")
        return value


_DESTINATION = re.compile(rf"^(?P<ae>[^@]{{1,{AE_MAX_LENGTH}}})@(?P<host>[^:@]+):(?P<port>\d{{1,5}})$")


class Destination(BaseModel):
    """A C-STORE SCP that receives the outputs, written AE@HOST:PORT."""

    model_config = ConfigDict(frozen=True)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = _DESTINATION.match(text.strip())
        if not match:
            raise ValueError(f"{text!r} is not AE@HOST:PORT")
        return cls(ae_title=_check_ae_title(match["ae"]), host=match["host"], port=int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DeliverySettings(_Section):
    """Where the SEG and SR go, and how hard to try."""

    destinations: list[str] = Field(default_factory=list, description="AE@HOST:PORT entries")
    dead_letter_after_hours: float = Field(
        default=72.0, gt=0,
        description="a delivery that keeps failing transiently becomes a dead letter only once it has waited this long")
    max_attempts: int | None = Field(
        default=None, ge=1,
        description="deprecated and ignored (a config that sets it still loads): transient failures are retried "
                    "until dead_letter_after_hours; the outbox logs a warning when it is set")
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0, description="the cap on the delay between two tries")
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: list[str]) -> list[str]:
        return [str(Destination.parse(v)) for v in values]

    def parsed_destinations(self) -> list[Destination]:
        return [Destination.parse(v) for v in self.destinations]


class ObservabilitySettings(_Section):
    """The HTTP endpoint for Prometheus (/metrics) and health checks (/healthz)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535, description="0: any free port")
    failed_jobs_unhealthy: int = Field(default=5, ge=1, description="/healthz fails when this many of the latest jobs all failed")
    dead_letters_unhealthy: int = Field(default=10, ge=1, description="/healthz fails when this many deliveries died within dead_letter_window_hours")
    dead_letter_window_hours: float = Field(default=24.0, gt=0, description="how far back dead letters count for /healthz")


class LoggingSettings(_Section):
    level: str = "INFO"
    json_format: bool = False

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return upper


class Settings(_Section):
    """All of qcgate's settings."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or SQLite (WAL) under the data dir."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.storage.layout.sqlite_database.resolve()}"


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    # Paths in a config file are relative to the file, so a unit's WorkingDirectory cannot change them.
    storage = raw.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("data_dir"), str):
        storage["data_dir"] = str((base / storage["data_dir"]).resolve())
    tls = raw.get("node", {}).get("tls") if isinstance(raw.get("node"), dict) else None
    if isinstance(tls, dict):
        for key in ("cert_file", "key_file", "ca_file"):
            if isinstance(tls.get(key), str):
                tls[key] = str((base / tls[key]).resolve())


def load_settings(path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read ``path`` (TOML) if given, apply ``overrides`` ({section: {key: value}}), and validate.

    Raises ConfigError naming the file and each bad key.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _resolve_relative_paths(raw, Path(path).resolve().parent)
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                raw.setdefault(section, {})[key] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
