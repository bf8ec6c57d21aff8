"""Database models: teams and their API keys, jobs, job events, artifacts, tuning trials and split parts.

Job state lives here, not in Celery's result backend: the API and the workers
move jobs between states with conditional UPDATEs on these rows.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Enum, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


JSONValue = JSON().with_variant(JSONB(), "postgresql")



class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONValue}


class JobState(str, enum.Enum):
    waiting = "waiting"  # accepted, held in the database until the dispatcher hands it to a worker (team queues)
    queued = "queued"  # handed to the broker: a worker takes it next
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = (JobState.waiting, JobState.queued, JobState.running, JobState.cancelling)
# Jobs holding (or about to hold) a worker: what a team's running cap and the free worker slots count.
DISPATCHED_STATES = (JobState.queued, JobState.running, JobState.cancelling)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled)


def _enum(cls: type[enum.Enum]) -> Enum:
    # VARCHAR rather than a native Postgres enum: adding a state is then no migration.
    return Enum(cls, native_enum=False, create_constraint=False, length=16, values_callable=lambda e: [m.value for m in e])


TEAM_NAME_MAX_CHARS = 100
LABEL_MAX_CHARS = 63
CANDIDATE_MAX_CHARS = 64  # a tuning candidate's label
KIND_MAX_CHARS = 16
DEPLOYMENT_MAX_CHARS = 255


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(TEAM_NAME_MAX_CHARS), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Its share of the workers against other teams with waiting jobs (service_core.fair_share).
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    # Jobs it may have on workers at once; None: the deployment's max_active_jobs_per_team. 0 holds its jobs.
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="team", cascade="all, delete-orphan")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    # sha256 of the key: keys are random 256-bit tokens, so a fast hash is safe.
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an admin can tell keys apart without storing them.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    team: Mapped[Team] = relationship(back_populates="api_keys")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_idempotency_key"),
        Index("ix_jobs_team_created", "team_id", "created_at", "id"),
        Index("ix_jobs_state_team", "state", "team_id"),  # the dispatcher's reads: waiting and dispatched jobs
        Index("ix_jobs_finished", "finished_at"),  # and the worker time used within the fair-share window
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    # A kind declared in workers.kinds; VARCHAR without a constraint, so a new kind is no migration.
    kind: Mapped[str] = mapped_column(String(KIND_MAX_CHARS))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.waiting)
    spec: Mapped[dict[str, Any]]
    # Order among its team's waiting jobs: higher first (not across teams: that is the teams' fair share).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the dispatcher (or the lease reaper) moved it to `queued`, and when its message reached the broker:
    # a job dispatched but never sent (its sender died in between) is sent again (service_core.team_queues).
    dispatched_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    # The broker key prefix of the API that accepted it: deployments sharing one database (as the tests' do) each
    # dispatch only their own jobs, to their own workers. One deployment: one value.
    deployment: Mapped[str] = mapped_column(String(DEPLOYMENT_MAX_CHARS), default="", server_default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))

    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_stage: Mapped[str | None] = mapped_column(String(32))
    progress_layer: Mapped[int | None] = mapped_column(Integer)
    progress_message: Mapped[str | None] = mapped_column(Text)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Renewed by the running worker (service_core.job_states.renew_lease); once it lapses the job is requeued or failed.
    lease_expires_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any] | None]
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    # Set when the artifacts were removed (DELETE, or expired by the retention setting); the record stays.
    deleted_at: Mapped[datetime | None]

    artifacts: Mapped[list[Artifact]] = relationship(back_populates="job", order_by="Artifact.name")
    labels: Mapped[list[JobLabel]] = relationship(back_populates="job", order_by="JobLabel.key",
                                                  cascade="all, delete-orphan")


class JobLabel(Base):
    """A user label of a job, `key=value`; a row each so lists filter by labels on every backend."""

    __tablename__ = "job_labels"
    __table_args__ = (Index("ix_job_labels_key_value", "key", "value"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(LABEL_MAX_CHARS), primary_key=True)
    value: Mapped[str] = mapped_column(String(LABEL_MAX_CHARS))

    job: Mapped[Job] = relationship(back_populates="labels")


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class Trial(Base):
    """One trial of a tuning job: a merge setting and its dev scores, recorded by the worker that ran it
    (or by the study, for a setting proposed again). Fields as `pivotmerge.report.study.TrialRecord`."""

    __tablename__ = "trials"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(String(CANDIDATE_MAX_CHARS))  # the candidate: a method, or a setting of one
    method: Mapped[str] = mapped_column(String(CANDIDATE_MAX_CHARS))
    params: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))  # complete, failed or repeat
    objective: Mapped[float | None] = mapped_column(Float)
    dev: Mapped[list[dict[str, Any]]] = mapped_column(JSONValue)  # metrics per dev set
    seconds: Mapped[float] = mapped_column(Float)
    merge_s: Mapped[float | None] = mapped_column(Float)
    evaluate_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))  # "node@host:pid"; none for a repeat
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SplitPart(Base):
    """One part of a split merge job: a run of output shards, merged by whichever worker of the split queue
    takes it (workers.split_parts). Leased as a job is: its worker renews `lease_expires_at` while it runs,
    and the job's worker sends it again once that lapses. Rows of an earlier attempt of the job are replaced
    when a new attempt sends its parts; a part task of the earlier attempt then writes nothing."""

    __tablename__ = "split_parts"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_attempt: Mapped[int] = mapped_column(Integer)  # the job's attempt that sent it
    shards: Mapped[list[int]] = mapped_column(JSONValue)
    state: Mapped[str] = mapped_column(String(16))  # queued, running, succeeded, stopped or failed
    task_id: Mapped[str | None] = mapped_column(String(255))  # the task last sent for it
    sends: Mapped[int] = mapped_column(Integer, default=0)
    starts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))  # "node@host:pid" of its latest run
    lease_expires_at: Mapped[datetime | None]
    done: Mapped[int] = mapped_column(Integer, default=0)  # tensors merged, of `total`
    total: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None]  # pivotmerge.run.split.PartResult, once succeeded
    message: Mapped[str | None] = mapped_column(Text)  # why it failed or stopped
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Webhook(Base):
    """A team's endpoint for job events; deliveries are signed with its secret."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[dict[str, Any]]  # {"events": [...]}: a JSON object, as every JSON column here
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryState(str, enum.Enum):
    pending = "pending"
    succeeded = "succeeded"
    failed = "failed"


class WebhookDelivery(Base):
    """One event for one endpoint: its attempts and the last response."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_webhook_created", "webhook_id", "created_at"),
                      Index("ix_webhook_deliveries_undispatched", "dispatched_at"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_response: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None]
    # Set when handed to the delivery task; the API's dispatcher sends the undispatched ones.
    dispatched_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


HEARTBEAT_SECONDS = 5.0  # how often a job worker's main process beats
LIVE_AFTER_MISSED_BEATS = 3  # a worker whose last beat is older than 3 beats counts as dead


class WorkerHeartbeat(Base):
    """A job worker's main process, beating every few seconds while it runs (workers.heartbeat);
    `GET /metrics` reports the beats, so an alert can see a dead worker pool."""

    __tablename__ = "worker_heartbeats"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name, "name@host"
    queues: Mapped[str] = mapped_column(String(1024))  # comma-separated
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(default=utcnow)
    deployment: Mapped[str] = mapped_column(String(DEPLOYMENT_MAX_CHARS), default="", server_default="")  # as Job's
