"""Service configuration, read from PIVOTMERGE_* environment variables.

With nothing set, everything lives under ``data_dir``: a SQLite database, a
SQLite-backed Celery broker and local artifact storage. That is the embedded
mode `pivotmerge serve` runs for a newcomer; a deployment points
PIVOTMERGE_DATABASE_URL at Postgres and PIVOTMERGE_BROKER_URL at Redis.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GPU_QUEUE = "gpu"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIVOTMERGE_", extra="ignore")

    data_dir: Path = Field(Path.home() / ".pivotmerge", description="Home of every embedded-mode default below.")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite in data_dir.")
    broker_url: str = Field("", description="Celery broker URL; default: a SQLite broker in data_dir (no server).")
    broker_key_prefix: str = Field("", description="Prefix for the broker's Redis keys, to share one Redis between deployments.")

    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = Field(None, description="Local artifact store; default: data_dir/artifacts.")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(None, description="For S3-compatible stores (MinIO, Ceph...).")
    s3_region: str | None = None
    s3_url_seconds: int = Field(3600, gt=0, description="Lifetime of the presigned download URLs of S3 artifacts.")

    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders model repos may be read from (os.pathsep-separated); default: data_dir/models.")
    work_dir: Path | None = Field(None, description="Scratch space for merges in progress; default: data_dir/work.")

    max_request_bytes: int = Field(1 << 20, gt=0, description="Largest request body; larger answers 413.")
    # The name predates team queues: it is now the running cap (the GPU quota), no longer a limit on submissions.
    max_active_jobs_per_team: int = Field(4, gt=0, description=(
        "Jobs a team may have on workers at once (queued + running), unless `pivotmerge admin set-team` gives the "
        "team its own cap; its other jobs wait."))
    max_waiting_jobs_per_team: int = Field(1000, gt=0, description="Jobs a team may have waiting; more answers 429.")
    dispatch_seconds: float = Field(1.0, gt=0, description=(
        "How often the API process hands waiting jobs to free workers (also at once after a submission, and a "
        "worker does it when a job ends)."))
    fair_share_window_seconds: float = Field(3600.0, gt=0, description=(
        "The worker time a team used within this window is what the fair share weighs against its weight."))
    retry_after_seconds: int = Field(30, gt=0, description="Retry-After sent with 429.")
    max_attempts: int = Field(3, gt=0, description="Times a job is started before a job whose worker keeps dying is failed.")
    task_soft_time_limit: int = Field(6 * 3600, gt=0, description="Seconds before a merge is stopped and failed.")
    task_time_limit: int = Field(6 * 3600 + 300, gt=0, description="Seconds before the worker process is killed.")
    # 15 s and 5 s: a dead worker's job is noticed within 20 s, so it runs again well inside the 60 s target.
    job_lease_seconds: int = Field(15, ge=3, description=(
        "A running job's lease: its worker renews it every third of this; once it lapses the job is requeued "
        "(or failed after max_attempts)."))
    lease_check_seconds: float = Field(5.0, gt=0, description="How often the API process looks for lapsed leases.")
    log_format: Literal["json", "text"] = Field("json", description=(
        "Log lines of the API and the workers: JSON objects carrying request id, job id, team and attempt, or text."))
    log_level: str = Field("INFO", description="Level of the API's and the workers' logs.")
    metrics_enabled: bool = Field(False, description=(
        "Serve GET /metrics (Prometheus) on the API: every job, team and worker of the deployment, with no key. "
        "Off by default; turn it on where only the monitoring network reaches the API, or behind a proxy."))
    housekeeping: bool = Field(True, description=(
        "Run the periodic work in this API process: job dispatcher, lease reaper, webhook dispatcher, retention."))
    artifact_retention_days: int = Field(0, ge=0, description="Artifacts of jobs finished longer ago are deleted; 0 keeps them.")
    retention_check_seconds: float = Field(3600.0, gt=0, description="How often the API looks for expired artifacts.")
    webhook_allow_private_addresses: bool = Field(False, description=(
        "Let webhooks reach private, loopback and link-local addresses (refused by default)."))
    webhook_max_attempts: int = Field(6, gt=0, description="Tries of a webhook delivery before it is marked failed.")
    webhook_backoff_seconds: float = Field(5.0, gt=0, description="Wait before the 2nd try; doubled for each next one.")
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Time a receiver has to answer one delivery.")
    webhook_dispatch_seconds: float = Field(1.0, gt=0, description="How often the API hands new deliveries to workers.")
    hub_allow_downloads: bool = Field(False, description=(
        "Let jobs download hub ids missing from the Hugging Face cache (off: only the cache answers)."))
    hub_token: SecretStr | None = Field(None, description="Token for jobs' push_to_hub; without it such jobs answer 422.")
    hub_endpoint: str | None = Field(None, description="The hub's URL for push_to_hub; default huggingface_hub's (HF_ENDPOINT).")
    trial_queue: str = Field("", description=(
        "Queue a tuning job sends its trials to, for the workers reading it (`-Q trials`); empty: the job's own "
        "worker runs them (one process, as the embedded service has)."))
    job_kind_modules: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Modules declaring job kinds beside the built-in ones (comma-separated), imported by the API and the workers "
        "(docs/service.md, Adding a job kind)."))
    broker_visibility_timeout: int = Field(7 * 3600, gt=0, description="Seconds before the broker redelivers an unacknowledged job.")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    @field_validator("job_kind_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @model_validator(mode="after")
    def _defaults_and_limits(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser()
        self.database_url = self.database_url or f"sqlite:///{self.data_dir / 'pivotmerge.db'}"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        self.storage_dir = (self.storage_dir or self.data_dir / "artifacts").expanduser()
        self.work_dir = (self.work_dir or self.data_dir / "work").expanduser()
        self.allowed_roots = [p.expanduser().resolve() for p in self.allowed_roots] or [self.data_dir / "models"]
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("PIVOTMERGE_S3_BUCKET is required when PIVOTMERGE_STORAGE=s3")
        # A job must be stopped (soft), then killed (hard), before the broker
        # hands its message to another worker, or two workers would run it at once.
        if not self.task_soft_time_limit < self.task_time_limit < self.broker_visibility_timeout:
            raise ValueError("need task_soft_time_limit < task_time_limit < broker_visibility_timeout")
        return self

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
