"""Typed settings, read from a TOML file and validated; flags override the common keys.

Every key is documented in ``deploy/qcgate.example.toml``. Unknown keys are errors, not
warnings: a misspelt ``stable_secnds`` must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

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


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _check_host_entry(value: str) -> str:
    """An IP address, a CIDR network, or a host name (resolved when the node starts)."""
    entry = value.strip()
    try:
        ipaddress.ip_network(entry, strict=False)
        return entry
    except ValueError:
        pass
    if not entry or "/" in entry or ":" in entry:  # meant as an address or a network
        raise ValueError(f"{value!r} is not a valid IP address or CIDR network")
    if re.fullmatch(r"[0-9.]+", entry) or not _HOST_NAME.match(entry):
        raise ValueError(f"{value!r} is not an IP address, a CIDR network or a host name")
    return entry


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
    allowed_hosts: list[str] = Field(default_factory=list, description="IP addresses, CIDR networks, or names resolved at start")
    max_associations: int = Field(default=16, ge=1, le=1024, description="concurrent negotiated associations")
    max_pdu_bytes: int = Field(default=4_194_304, ge=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    association_request_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="from accept to a complete A-ASSOCIATE-RQ (TLS handshake included)")
    max_pending_connections: int = Field(
        default=32, ge=1, le=4096, description="connections that have not sent their A-ASSOCIATE-RQ; the oldest is closed past it")
    max_connections_per_host: int = Field(default=32, ge=1, le=4096, description="concurrent TCP connections from one address")
    max_association_request_bytes: int = Field(
        default=65_536, ge=4096, le=16_777_216, description="largest PDU accepted before association (an A-ASSOCIATE-RQ is a few KB)")
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

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, values: list[str]) -> list[str]:
        return [_check_host_entry(v) for v in values]


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
    max_job_attempts: int = Field(default=3, ge=1, description="a job whose worker died, timed out or lost its lease this often is failed")
    lease_seconds: float = Field(default=60.0, gt=0, description="a running job whose lease is this old is re-queued by any dispatcher")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="how often a dispatcher renews the leases of its running jobs")
    job_memory_limit_mb: int = Field(default=4096, ge=0, description="address-space limit of each worker process (RLIMIT_AS); 0: none")
    executor: str = Field(default="local", description='"local" (a process pool of `workers`) or "dask://HOST:PORT" (a Dask scheduler)')
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
    write_secondary_capture: bool = Field(
        default=False, description="also send a Secondary Capture series: a summary and one burned-in image per lesion slice")
    write_pdf: bool = Field(default=False, description="also send the report as an Encapsulated PDF")

    @field_validator("series_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in {"strict", "fraction"}:
            raise ValueError(f"{value!r} is not one of strict, fraction")
        return value

    @field_validator("executor")
    @classmethod
    def _executor(cls, value: str) -> str:
        value = value.strip()
        if value == "local":
            return value
        host, _, port = value.removeprefix("dask://").rpartition(":")
        if not value.startswith("dask://") or not host or any(c in host for c in "/@ ") or not port.isdigit() \
                or not 1 <= int(port) <= 65535:
            raise ValueError(f'{value!r} is neither "local" nor "dask://HOST:PORT" (a Dask scheduler, e.g. dask://qc-sched:8786)')
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "PipelineSettings":
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("pipeline.lease_seconds must be at least twice pipeline.heartbeat_seconds")
        return self


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


# What a destination rule can name (docs/OPERATIONS.md "What is sent where"). ``qc-seg`` is the output
# kind ``seg``; ``ai-seg`` is the AI's own SEG instance(s) of the case, sent from the spool.
ROUTABLE_OBJECTS = ("ai-seg", "qc-seg", "sr", "sc", "pdf", "pmap", "report")
SERIES_VERDICTS = ("accept", "review", "reject")
# A plain ``destinations = [...]`` entry: what qcgate always sent, on every verdict.
DEFAULT_OBJECTS = ("qc-seg", "sr", "pmap")
DESTINATION_TYPES = ("dimse", "stow", "webhook")
DESTINATION_KEY_LENGTH = 128  # deliveries.destination


def destination_type(address: str) -> str:
    """``dimse`` (AE@HOST:PORT), ``webhook`` (webhook+http(s)://...) or ``stow`` (http(s)://.../dicom-web)."""
    text = address.strip()
    if text.startswith(("webhook+http://", "webhook+https://")):
        return "webhook"
    if text.startswith(("http://", "https://")):
        return "stow"
    Destination.parse(text)
    return "dimse"


def _check_url(text: str) -> str:
    from urllib.parse import urlsplit

    url = text.removeprefix("webhook+")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(f"{parts.scheme}://{parts.hostname}...: put credentials in username/password or token, not in the URL")
    return text.strip().rstrip("/")


class DestinationSettings(_Section):
    """One ``[[delivery.destination]]`` table: where, what, on which verdicts, and how to get there."""

    name: str = Field(default="", description="the destination's name in the outbox and the audit; default: the address")
    address: str = Field(description="AE@HOST:PORT (C-STORE), https://host/dicom-web (STOW-RS) or webhook+https://host/path")
    type: str | None = Field(default=None, description="dimse | stow | webhook; default: from the address")
    objects: list[str] = Field(default_factory=lambda: list(DEFAULT_OBJECTS), description=f"any of {', '.join(ROUTABLE_OBJECTS)}")
    verdicts: list[str] = Field(default_factory=lambda: list(SERIES_VERDICTS), description="series verdicts it receives on")
    # TLS: DIMSE over TLS when tls = true; for https URLs the CA file replaces the system's CAs.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    # STOW-RS (and webhook) authentication: a bearer token, or HTTP basic auth.
    token: SecretStr | None = None
    token_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # Webhook: the HMAC-SHA256 secret that signs each body.
    hmac_secret: SecretStr | None = None
    hmac_secret_file: Path | None = None

    @field_validator("objects")
    @classmethod
    def _objects(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in ROUTABLE_OBJECTS:
                raise ValueError(f"unknown object {value!r}: one of {', '.join(ROUTABLE_OBJECTS)}")
        return list(dict.fromkeys(values))

    @field_validator("verdicts")
    @classmethod
    def _verdicts(cls, values: list[str]) -> list[str]:
        for value in values:
            if value not in SERIES_VERDICTS:
                raise ValueError(f"unknown verdict {value!r}: one of {', '.join(SERIES_VERDICTS)}")
        if not values:
            raise ValueError("a destination needs at least one verdict")
        return list(dict.fromkeys(values))

    @field_validator("type")
    @classmethod
    def _type(cls, value: str | None) -> str | None:
        if value is not None and value not in DESTINATION_TYPES:
            raise ValueError(f"{value!r} is not one of {', '.join(DESTINATION_TYPES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DestinationSettings":
        kind = self.type or destination_type(self.address)
        if self.type is None:
            object.__setattr__(self, "type", kind)
        if kind == "dimse":
            object.__setattr__(self, "address", str(Destination.parse(self.address)))
            if not self.tls and (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
                raise ValueError("tls_ca_file / tls_cert_file / tls_key_file need tls = true on a DICOM destination")
            if "report" in self.objects:
                raise ValueError("objects: 'report' is the HTML report, not a DICOM object; send 'pdf'")
        else:
            address = self.address if kind != "webhook" or self.address.startswith("webhook+") else "webhook+" + self.address
            object.__setattr__(self, "address", _check_url(address))
            if self.tls:
                raise ValueError("tls = true is for DICOM destinations; an https:// URL is TLS already")
        if kind == "stow" and "report" in self.objects:
            raise ValueError("objects: 'report' is the HTML report, not a DICOM object; send 'pdf'")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.token is not None and self.token_file is not None:
            raise ValueError("token and token_file: set one")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: set one")
        if (self.token or self.token_file) and self.username:
            raise ValueError("a bearer token or username/password: set one")
        if kind == "webhook":
            if (self.hmac_secret is None) == (self.hmac_secret_file is None):
                raise ValueError("a webhook needs one of hmac_secret, hmac_secret_file")
        elif self.hmac_secret is not None or self.hmac_secret_file is not None:
            raise ValueError("hmac_secret is for webhook destinations")
        if not self.name.strip():
            object.__setattr__(self, "name", self.address)
        if len(self.name) > DESTINATION_KEY_LENGTH:
            raise ValueError(f"name: at most {DESTINATION_KEY_LENGTH} characters (give a shorter name)")
        return self

    @property
    def key(self) -> str:
        """What ``deliveries.destination`` holds for this destination."""
        return self.name

    def wants(self, obj: str) -> bool:
        return self.type == "webhook" or obj in self.objects


class DeliverySettings(_Section):
    """Where the outputs go (with rules by object and verdict), and how hard to try."""

    destinations: list[str] = Field(default_factory=list, description="AE@HOST:PORT (or URL) entries, each with the default rule")
    destination: list[DestinationSettings] = Field(default_factory=list, description="destinations with rules ([[delivery.destination]])")
    console_url: str = Field(default="", description="public base URL of the console, for links in webhook payloads")
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
    lease_seconds: float = Field(
        default=60.0, gt=0, description="a delivery being sent whose lease is this old is claimed again by any delivering node")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="how often a delivering node renews the leases of its sends")

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> DeliverySettings:
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("delivery.lease_seconds must be at least twice delivery.heartbeat_seconds")
        return self

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, values: list[str]) -> list[str]:
        out = []
        for value in values:
            kind = destination_type(value)
            out.append(str(Destination.parse(value)) if kind == "dimse" else _check_url(value))
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> "DeliverySettings":
        seen: set[str] = set()
        for target in self.targets():
            if target.key in seen:
                raise ValueError(f"two destinations are called {target.key!r}: give each a distinct name")
            seen.add(target.key)
        return self

    def targets(self) -> list[DestinationSettings]:
        """Every destination with its rule: the plain entries (default rule) and the tables."""
        return [DestinationSettings(address=text) for text in self.destinations] + list(self.destination)

    def parsed_destinations(self) -> list[Destination]:
        """The DIMSE addresses of the plain entries (older callers)."""
        return [Destination.parse(v) for v in self.destinations if destination_type(v) == "dimse"]


class WorkerSettings(_Section):
    """What `qcgate worker` runs besides the QC jobs."""

    deliver: bool = Field(
        default=False, description="also run the outbox (any node delivers, under leases); the worker's [delivery] "
                                   "destinations and rules must then equal those `qcgate serve` recorded in the database")


class ObservabilitySettings(_Section):
    """What /metrics and /healthz report. ``enabled``, ``host`` and ``port`` are the old names of the
    HTTP server's settings, still honoured where ``[http]`` leaves them unset (see ``HttpSettings``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535, description="0: any free port")
    failed_jobs_unhealthy: int = Field(default=5, ge=1, description="/healthz fails when this many of the latest jobs all failed")
    dead_letters_unhealthy: int = Field(default=10, ge=1, description="/healthz fails when this many deliveries died within dead_letter_window_hours")
    dead_letter_window_hours: float = Field(default=24.0, gt=0, description="how far back dead letters count for /healthz")


class HttpSettings(_Section):
    """The one HTTP server of `qcgate serve`: the web console, /api, /metrics and /healthz.

    ``enabled``, ``host`` and ``port`` left unset fall back to ``observability.enabled``, ``.host``
    and ``.port`` (their names before the console existed), so an older settings file keeps its port.
    """

    enabled: bool | None = Field(default=None, description="default observability.enabled (true)")
    host: str | None = Field(default=None, description="default observability.host (127.0.0.1: loopback only)")
    port: int | None = Field(default=None, ge=0, le=65535, description="default observability.port (9464); 0: any free port")
    tls_cert_file: Path | None = Field(default=None, description="serve HTTPS with this certificate (PEM)")
    tls_key_file: Path | None = None
    secure_cookies: bool = Field(default=False, description="mark cookies Secure without TLS here (behind a TLS proxy)")
    session_hours: float = Field(default=12.0, gt=0, description="a console login lasts this long")
    login_attempts_per_minute: int = Field(default=5, ge=1, description="failed logins allowed per user name and per address")
    page_size: int = Field(default=50, ge=1, le=1000, description="rows per page in the console's lists")
    stow_max_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="largest STOW-RS request body (POST /dicomweb/studies); larger: 413")
    stow_max_part_bytes: int = Field(
        default=1024**3, ge=1024, description="largest instance in a STOW-RS request; larger: that instance fails (0xA700)")

    @model_validator(mode="after")
    def _tls_pair(self) -> "HttpSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("http.tls_cert_file and http.tls_key_file go together")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


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
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def http_enabled(self) -> bool:
        """Whether `qcgate serve` runs the HTTP server: http.enabled, else observability.enabled."""
        return self.http.enabled if self.http.enabled is not None else self.observability.enabled

    @property
    def http_bind(self) -> tuple[str, int]:
        """(host, port) of the HTTP server: http.host/port, else observability.host/port."""
        host = self.http.host if self.http.host is not None else self.observability.host
        port = self.http.port if self.http.port is not None else self.observability.port
        return host, port

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
    http = raw.get("http")
    if isinstance(http, dict):
        for key in ("tls_cert_file", "tls_key_file"):
            if isinstance(http.get(key), str):
                http[key] = str((base / http[key]).resolve())
    tls = raw.get("node", {}).get("tls") if isinstance(raw.get("node"), dict) else None
    if isinstance(tls, dict):
        for key in ("cert_file", "key_file", "ca_file"):
            if isinstance(tls.get(key), str):
                tls[key] = str((base / tls[key]).resolve())
    delivery = raw.get("delivery")
    tables = delivery.get("destination") if isinstance(delivery, dict) else None
    for table in tables if isinstance(tables, list) else []:
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "token_file", "password_file", "hmac_secret_file"):
            if isinstance(table, dict) and isinstance(table.get(key), str):
                table[key] = str((base / table[key]).resolve())


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
