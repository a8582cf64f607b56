"""The screening database: SQLAlchemy 2 typed ORM, the same schema on SQLite and PostgreSQL.

The database is the bookkeeper between roles: the listener writes instances and studies, the scheduler
turns quiet studies into jobs, the worker writes findings and deliveries, the dispatcher sends.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    patient_age_years: Mapped[float | None] = mapped_column(Float)
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_bmi: Mapped[float | None] = mapped_column(Float)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # receiving → queued → screened | failed; back to receiving when a late image arrives
    status: Mapped[str] = mapped_column(String(16), default="receiving")
    # the previous SR this study's next report must reference as its predecessor
    last_report_uid: Mapped[str | None] = mapped_column(String(64))
    last_report_path: Mapped[str | None] = mapped_column(Text)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime)
    instances: Mapped[list["Instance"]] = relationship(back_populates="study")
    findings: Mapped[list["Finding"]] = relationship(back_populates="study")
    __table_args__ = (Index("ix_studies_status_last", "status", "last_received_at"),
                      Index("ix_studies_first_received", "first_received_at", "id"))  # lists, statistics


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    region: Mapped[str | None] = mapped_column(String(16))  # hip | lumbar
    view: Mapped[str | None] = mapped_column(String(8))  # ap | lat
    eligible: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # set when retention removed the spool file (the row, and what was learnt from it, stay)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)
    # the drift watch's inputs, read from the header on receipt: Manufacturer|ManufacturerModelName, and
    # station, serial, pixel spacing, bits stored, photometric interpretation, exposure index, kVp
    scanner: Mapped[str | None] = mapped_column(String(200))
    acquisition: Mapped[dict | None] = mapped_column(JSON)
    study: Mapped[Study] = relationship(back_populates="instances")
    __table_args__ = (Index("ix_instances_scanner_received", "scanner", "received_at"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    __table_args__ = (Index("ix_jobs_state", "state", "lease_expires_at"),)


class Finding(Base):
    __tablename__ = "findings"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(16))
    assessable: Mapped[bool] = mapped_column(Boolean)
    category: Mapped[str | None] = mapped_column(String(16))
    probabilities: Mapped[dict | None] = mapped_column(JSON)
    t_score: Mapped[float | None] = mapped_column(Float)
    # prediction interval of t_score at interval_level; the site calibration behind it (None: the model's own)
    t_score_low: Mapped[float | None] = mapped_column(Float)
    t_score_high: Mapped[float | None] = mapped_column(Float)
    interval_level: Mapped[float | None] = mapped_column(Float)
    calibration_id: Mapped[str | None] = mapped_column(String(32))
    scanner: Mapped[str | None] = mapped_column(String(200))  # Manufacturer|ManufacturerModelName of the image
    reason: Mapped[str | None] = mapped_column(Text)
    # out-of-distribution distance over the gate's threshold (above 1: refused as unlike the training crops)
    ood_score: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    study: Mapped[Study] = relationship(back_populates="findings")
    __table_args__ = (Index("ix_findings_study_job", "study_id", "job_id"),)  # a study's latest findings


class Delivery(Base):
    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # sr | heatmap | kos
    path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(128))  # AET@HOST:PORT
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|sending|delivered|dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    # set when retention removed the outbox file of this delivered object (it can no longer be re-sent)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)
    __table_args__ = (Index("ix_deliveries_due", "state", "next_attempt_at"),
                      Index("ux_delivery_object_dest", "sop_instance_uid", "destination", unique=True))


class DestinationCircuit(Base):
    """Circuit breaker of one destination, shared by every dispatcher process through the database.

    closed: send as usual. After `dispatch_circuit_failures` consecutive association-level failures
    the circuit is open: nothing is sent there until retry_at. Then one dispatcher wins the half-open
    probe (a single object; retry_at becomes the probe's lease); success closes the circuit, failure
    opens it again for longer."""

    __tablename__ = "destination_circuits"
    destination: Mapped[str] = mapped_column(String(128), primary_key=True)  # AET@HOST:PORT
    state: Mapped[str] = mapped_column(String(16), default="closed")  # closed|open|half_open
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None] = mapped_column(DateTime)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime)  # open: probe allowed from; half_open: probe lease
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """PHI-free trail: who sent what, what was returned. Identifiers are UIDs, never names or IDs."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(32))
    peer: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class Acknowledgement(Base):
    """A screening coordinator acted on a study's positive report (referred, already known, …): the study
    leaves the follow-up worklist until a new report replaces that one (report_uid). A mistaken one is
    revoked (revoked_at/by), not deleted; only retention.rows_days removes them, with their study."""

    __tablename__ = "acknowledgements"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    report_uid: Mapped[str | None] = mapped_column(String(64))  # the SR that was current when acknowledged
    by: Mapped[str] = mapped_column(String(64))  # user name (dashboard login, or `db ack --by`)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    note: Mapped[str | None] = mapped_column(Text)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(64))


class ProcessHeartbeat(Base):
    """One running osteoscreen process and its roles, refreshed every few seconds: node health and the
    container health checks read it (`osteoscreen health`)."""

    __tablename__ = "process_heartbeats"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)  # host:pid:start
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(64))  # comma-separated: listen,work,dispatch,web
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class DriftCheck(Base):
    """One drift check of one scanner group (a key as in `calibrations:`): its status (ok | drift |
    silent | insufficient data), the signals that moved, and each signal's test. The latest row per
    group is its status; the rows before it are its history."""

    __tablename__ = "drift_checks"
    id: Mapped[int] = mapped_column(primary_key=True)
    scanner: Mapped[str] = mapped_column(String(200))
    checked_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(24))
    signals: Mapped[list | None] = mapped_column(JSON)  # names of the signals that moved
    details: Mapped[dict | None] = mapped_column(JSON)  # windows, per-signal statistic and p-value
    __table_args__ = (Index("ix_drift_checks_scanner_at", "scanner", "checked_at"),)


class Outcome(Base):
    """One DXA result imported by `osteoscreen db outcomes import` (the reference standard of the
    screening): per-site T-scores, and the screened study it was matched to (by study_uid, so that
    retention may remove the study; the outcome then no longer counts). Unique per patient, DXA date and
    accession ("" when the file gave none). match_status: matched | unmatched | ambiguous, with the
    reason and the number of candidate studies; re-matched on every import and `db outcomes match`."""

    __tablename__ = "outcomes"
    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    dxa_date: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD
    accession: Mapped[str] = mapped_column(String(16), default="")
    left_hip_t_score: Mapped[float | None] = mapped_column(Float)
    right_hip_t_score: Mapped[float | None] = mapped_column(Float)
    lumbar_spine_t_score: Mapped[float | None] = mapped_column(Float)
    left_hip_neck_t_score: Mapped[float | None] = mapped_column(Float)
    right_hip_neck_t_score: Mapped[float | None] = mapped_column(Float)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)  # the matched study
    match_status: Mapped[str] = mapped_column(String(16), default="unmatched")
    match_reason: Mapped[str | None] = mapped_column(Text)
    candidates: Mapped[int] = mapped_column(Integer, default=0)
    source_line: Mapped[int | None] = mapped_column(Integer)  # line in the file last imported from
    imported_by: Mapped[str | None] = mapped_column(String(64))
    imported_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index("ux_outcomes_key", "patient_id", "dxa_date", "accession", unique=True),
                      Index("ix_outcomes_status", "match_status"))
