"""Audit database tables.

Patient identifiers: none are stored. Cases are found by study and series UID, which is what
"why was this series rejected" and "was the result delivered" need.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from qcgate.core.dicom import AE_MAX_LENGTH, CS_MAX_LENGTH, LO_MAX_LENGTH, UI_MAX_LENGTH

# Column widths, in characters. Whoever writes a value that may be longer truncates it to the
# width's name, never to a bare number. DICOM-valued columns take their value representation's
# maximum length; the migrations spell the same numbers (changing one here needs a migration).
UID_LENGTH = UI_MAX_LENGTH  # SOP class / instance, study, series and transfer syntax UIDs
AE_TITLE_LENGTH = AE_MAX_LENGTH  # calling and called AE titles
MODALITY_LENGTH = CS_MAX_LENGTH
LONG_STRING_LENGTH = LO_MAX_LENGTH  # a SEG's Manufacturer, algorithm name and version
HOST_LENGTH = 64  # the peer's address as the association reports it
STATE_LENGTH = 16  # states, verdicts, outcomes and output kinds (the enums' values)
REFUSED_UID_LENGTH = 128  # refused_instances keeps UIDs as received, valid or not
REASON_CODE_LENGTH = 32  # a qcgate.core.refusals.RefusalCode value
SHA256_HEX_LENGTH = 64
MODEL_NAME_LENGTH = 64
MODEL_VERSION_LENGTH = 32
Q_SOURCE_LENGTH = 32
JOB_KIND_LENGTH = 32
WORKER_LENGTH = 128  # the claim token: host:pid:random
DESTINATION_LENGTH = 128  # AE@host:port

UID = String(UID_LENGTH)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class CaseState(str, enum.Enum):
    """Life of a case: collecting -> ready (job queued) -> done | failed; or incomplete (timed out)."""

    COLLECTING = "collecting"
    READY = "ready"
    INCOMPLETE = "incomplete"
    DONE = "done"
    FAILED = "failed"


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class AssociationRecord(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(AE_TITLE_LENGTH))
    called_ae: Mapped[str] = mapped_column(String(AE_TITLE_LENGTH))
    peer_host: Mapped[str] = mapped_column(String(HOST_LENGTH))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # accepted -> released | aborted; or rejected with a reason
    outcome: Mapped[str] = mapped_column(String(STATE_LENGTH), default="accepted")
    reason: Mapped[str | None] = mapped_column(Text)
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_associations_started_at", "started_at"),
        # audit: cases and slices by calling AE
        Index("ix_associations_calling_ae", "calling_ae"),
    )


class Case(Base):
    """One CT series and the SEG instances that reference it."""

    __tablename__ = "cases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    ct_series_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(STATE_LENGTH), default=CaseState.COLLECTING.value)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_instance_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ready_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Filled by the QC job.
    series_verdict: Mapped[str | None] = mapped_column(String(STATE_LENGTH))
    model_name: Mapped[str | None] = mapped_column(String(MODEL_NAME_LENGTH))
    model_version: Mapped[str | None] = mapped_column(String(MODEL_VERSION_LENGTH))
    q_source: Mapped[str | None] = mapped_column(String(Q_SOURCE_LENGTH))
    n_members: Mapped[int | None] = mapped_column(Integer)
    uses_uncertainty: Mapped[bool | None] = mapped_column(Boolean)
    notes: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    instances: Mapped[list["Instance"]] = relationship(back_populates="case")
    jobs: Mapped[list["Job"]] = relationship(back_populates="case")

    __table_args__ = (
        Index("ix_cases_state", "state"),
        Index("ix_cases_study", "study_instance_uid"),
        # audit: "all rejected series ... last week" and retention by age
        Index("ix_cases_verdict_created", "series_verdict", "created_at"),
        Index("ix_cases_created_at", "created_at"),
        Index("ix_cases_model_version", "model_version"),
    )


class Instance(Base):
    """One acknowledged SOP instance, stored in the spool exactly as received."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(MODALITY_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    spool_path: Mapped[str] = mapped_column(Text)  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    # SEG only: what it segments and who made it (for "how often does vendor X fail")
    referenced_series_uid: Mapped[str | None] = mapped_column(UID)
    manufacturer: Mapped[str | None] = mapped_column(String(LONG_STRING_LENGTH))
    algorithm_name: Mapped[str | None] = mapped_column(String(LONG_STRING_LENGTH))
    algorithm_version: Mapped[str | None] = mapped_column(String(LONG_STRING_LENGTH))

    case: Mapped[Case | None] = relationship(back_populates="instances")
    references: Mapped[list["SegReference"]] = relationship(back_populates="seg", cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_instances_series", "series_instance_uid"),
        Index("ix_instances_case", "case_id"),
        Index("ix_instances_referenced_series", "referenced_series_uid"),
        # audit: the cases of one vendor / algorithm / calling AE (EXISTS on case_id)
        Index("ix_instances_manufacturer_case", "manufacturer", "case_id"),
        Index("ix_instances_algorithm_case", "algorithm_name", "case_id"),
        Index("ix_instances_association", "association_id"),
    )


class SegReference(Base):
    """A CT instance that a SEG's frames are derived from (its source image references)."""

    __tablename__ = "seg_references"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seg_instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    referenced_sop_instance_uid: Mapped[str] = mapped_column(UID)

    seg: Mapped[Instance] = relationship(back_populates="references")

    __table_args__ = (
        UniqueConstraint("seg_instance_id", "referenced_sop_instance_uid", name="uq_seg_reference"),
        Index("ix_seg_references_sop", "referenced_sop_instance_uid"),
    )


class RefusedInstance(Base):
    """An instance that was received but not accepted; the bytes are kept in quarantine."""

    __tablename__ = "refused_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(REFUSED_UID_LENGTH))
    sop_class_uid: Mapped[str | None] = mapped_column(String(REFUSED_UID_LENGTH))
    reason_code: Mapped[str] = mapped_column(String(REASON_CODE_LENGTH))  # a RefusalCode (qcgate.core.refusals)
    reason: Mapped[str] = mapped_column(Text)
    dimse_status: Mapped[int] = mapped_column(Integer)
    quarantine_path: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_refused_reason", "reason_code"),)


class Job(Base):
    """The durable work queue: one row per ready case, consumed by the pipeline workers."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"))
    kind: Mapped[str] = mapped_column(String(JOB_KIND_LENGTH), default="qc")
    state: Mapped[str] = mapped_column(String(STATE_LENGTH), default=JobState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(WORKER_LENGTH))  # the claim token: host:pid:random
    worker_host: Mapped[str | None] = mapped_column(String(WORKER_LENGTH))  # the host of the claiming dispatcher
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # re-queued by anyone after this
    error: Mapped[str | None] = mapped_column(Text)  # pending: why earlier attempts ended; failed: the reason
    timings: Mapped[str | None] = mapped_column(Text)  # JSON {stage: seconds}

    case: Mapped[Case] = relationship(back_populates="jobs")

    __table_args__ = (
        UniqueConstraint("case_id", "kind", name="uq_job_case_kind"),
        Index("ix_jobs_state", "state"),
    )


class SliceResultRecord(Base):
    """One lesion slice's decision: the threshold, the quality, the verdict and why."""

    __tablename__ = "slice_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID)  # the source CT slice
    slice_index: Mapped[int] = mapped_column(Integer)
    tau: Mapped[float] = mapped_column(Float)
    q: Mapped[float | None] = mapped_column(Float)
    # where q came from ("learned-um", "reference", "none", ...); migration 0009 (older rows: the case's)
    q_source: Mapped[str | None] = mapped_column(String(Q_SOURCE_LENGTH))
    margin: Mapped[float] = mapped_column(Float)  # m_accept: accept if q >= tau + margin
    margin_reject: Mapped[float | None] = mapped_column(Float)  # m_reject: reject if q < tau - margin_reject (0009)
    review_reason: Mapped[str | None] = mapped_column(Text)  # why review was forced, NULL otherwise (0009)
    verdict: Mapped[str] = mapped_column(String(STATE_LENGTH))
    lesion_area_mm2: Mapped[float] = mapped_column(Float)
    um_mean: Mapped[float | None] = mapped_column(Float)
    um_p90: Mapped[float | None] = mapped_column(Float)
    key_features: Mapped[str | None] = mapped_column(Text)  # JSON {name: value}
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_slice_results_case", "case_id"),
        Index("ix_slice_results_verdict", "verdict"),
        # audit: slices by verdict and date
        Index("ix_slice_results_verdict_created", "verdict", "created_at"),
        Index("ix_slice_results_created", "created_at"),
        # per-case probe when a vendor/AE filter drives the plan: only the matching slices are read
        Index("ix_slice_results_case_verdict_created", "case_id", "verdict", "created_at"),
        UniqueConstraint("job_id", "sop_instance_uid", name="uq_slice_result_job_sop"),
    )


class Output(Base):
    """A DICOM object (or report) a QC job produced, kept under the data dir."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(STATE_LENGTH))  # seg | sr | pmap | report | ai-seg (routing)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the data dir
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When `serve`'s router made this output's delivery rows (pending or held) from its rules; NULL:
    # not routed yet (qcgate.delivery.routing). Migration 0007.
    routed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_outputs_case", "case_id"),
        # one output per kind and file: a case may have several ai-seg outputs (migration 0007)
        UniqueConstraint("job_id", "kind", "path", name="uq_output_job_kind_path"),
        Index("ix_outputs_routed_at", "routed_at"),
        # audit: "was this SR delivered", asked with the SR's SOP Instance UID
        Index("ix_outputs_sop", "sop_instance_uid"),
    )


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # permanent refusal or too many attempts
    HELD = "held"  # waits for a reviewer's decision (qcgate.delivery.routing); migration 0007
    DISCARDED = "discarded"  # held, then the reviewer rejected the case: never sent


class Delivery(Base):
    """The outbox: one row per (output, destination)."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"))
    destination: Mapped[str] = mapped_column(String(DESTINATION_LENGTH))  # AE@host:port
    state: Mapped[str] = mapped_column(String(STATE_LENGTH), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When it (last) joined the queue: creation, or a re-queue by `qcgate deliveries retry`; the
    # dead-letter age (delivery.dead_letter_after_hours) counts from here. Migration 0004; the
    # server default serves inserts that name only the older columns (bulk loads).
    queued_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                   server_default=text("CURRENT_TIMESTAMP"))
    # When it was held for review (it stays set after a release or discard). Migration 0007.
    held_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The node sending it now (claim token host:pid:random) and until when; any node may claim a
    # pending row whose lease is NULL or past (qcgate.delivery.leases). Migration 0008.
    sender: Mapped[str | None] = mapped_column(String(WORKER_LENGTH))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_deliveries_due", "state", "next_attempt_at"),
        UniqueConstraint("output_id", "destination", name="uq_delivery_output_destination"),
    )


class DeliveryAttempt(Base):
    """Every attempt to deliver, successful or not."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    attempted_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    outcome: Mapped[str] = mapped_column(String(STATE_LENGTH))  # sent | transient | permanent
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str | None] = mapped_column(String(WORKER_LENGTH))  # the node that tried (migration 0008)

    __table_args__ = (Index("ix_delivery_attempts_delivery", "delivery_id"),)


# The outbox per destination, oldest first (migration 0004).
Index("ix_deliveries_destination_state", Delivery.destination, Delivery.state, Delivery.id)


class DestinationState(Base):
    """One destination's shared backoff, so that every node delivering to it backs off together.

    ``consecutive_failures``: transient failures of the destination since it last answered;
    ``next_attempt_at``: no node tries it before then (the backoff, or the lease of the one probe
    in flight); ``prober``: the claim token of the node probing it now. Migration 0008.
    """

    __tablename__ = "destination_states"

    destination: Mapped[str] = mapped_column(String(DESTINATION_LENGTH), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    prober: Mapped[str | None] = mapped_column(String(WORKER_LENGTH))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


SHARED_SETTINGS_NAME_LENGTH = 64
FINGERPRINT_LENGTH = 64  # a SHA-256 in hex


class SharedSettings(Base):
    """Settings every node must agree on, as `qcgate serve` recorded them at its start: the canonical
    document (no secrets) and its SHA-256. ``name`` ``delivery``: the destinations and their rules
    (qcgate.delivery.fingerprint). Migration 0008."""

    __tablename__ = "shared_settings"

    name: Mapped[str] = mapped_column(String(SHARED_SETTINGS_NAME_LENGTH), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH))
    document: Mapped[str] = mapped_column(Text)  # canonical JSON
    recorded_by: Mapped[str] = mapped_column(String(WORKER_LENGTH))  # host:pid of the serve that wrote it
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


ACTION_USER_LENGTH = 128  # who: a login or a name
ACTION_NAME_LENGTH = 64  # what: e.g. delivery.retry
ACTION_OBJECT_TYPE_LENGTH = 32  # to what kind of row: e.g. delivery
ACTION_OBJECT_ID_LENGTH = 64  # its id, or a UID


class Action(Base):
    """Something a person did (re-queue a dead letter, ...): who, when, to what, and why.

    Written with :func:`qcgate.store.actions.record_action` in the same transaction as the change
    itself; read with `qcgate audit actions`. Migration 0004.
    """

    __tablename__ = "actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[str] = mapped_column(String(ACTION_USER_LENGTH))
    action: Mapped[str] = mapped_column(String(ACTION_NAME_LENGTH))
    object_type: Mapped[str | None] = mapped_column(String(ACTION_OBJECT_TYPE_LENGTH))
    object_id: Mapped[str | None] = mapped_column(String(ACTION_OBJECT_ID_LENGTH))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[str | None] = mapped_column(Text)  # JSON object

    __table_args__ = (
        Index("ix_actions_at", "at"),
        Index("ix_actions_user_at", "user", "at"),
    )


# --- The web console's people: users, their API tokens and login sessions, and review decisions.


class UserRole(str, enum.Enum):
    """Viewers read; reviewers also decide reviews; admins also re-send deliveries and re-queue jobs.
    Senders are machines: they only store instances (STOW-RS) and see nothing of the console."""

    VIEWER = "viewer"
    REVIEWER = "reviewer"
    ADMIN = "admin"
    SENDER = "sender"


class User(Base):
    """A person who signs in to the console or calls the API. The password is an argon2id hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """A bearer token for /api: only its SHA-256 is kept (the token is 32 random bytes, shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_api_tokens_user", "user_id"),)


class ConsoleSession(Base):
    """A console login: the cookie carries a random id whose SHA-256 is kept here, with the CSRF token
    that every POST of the session must send back."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_console_sessions_expires", "expires_at"), Index("ix_console_sessions_user", "user_id"))


class ReviewDecision(Base):
    """A person's decision on a case whose series verdict is ``review``: accept or reject, and why.
    One per case; the machine's verdict (``cases.series_verdict``) is left as it was. Deleted with its
    case by retention; the people's audit trail (the actions table) keeps the decision."""

    __tablename__ = "review_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), unique=True)
    decision: Mapped[str] = mapped_column(String(16))  # accept | reject
    user_name: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    decided_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_review_decisions_decided_at", "decided_at"),)
