"""Request and response bodies of the HTTP API.

The request bodies of the job kinds are declared with the kinds (workers.kinds): for merges and
analyses the engine's own `pivotmerge.spec.MergeSpec`, one schema for the CLI's YAML and the API's
JSON; for tunings such a spec with what `pivotmerge tune` takes beside it (service_core.tuning_request).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from pivotmerge.data.evaluate import Evaluation

from service_core.models import JobState


MAX_SEQ = 2**31 - 1  # event numbers are 32-bit integers in the database


class TrialOut(BaseModel):
    number: int = Field(..., description="From 0, in the order the study proposed them.")
    label: str = Field(..., description="The candidate: a method, or a label of `space`.")
    method: str
    params: dict[str, Any] = Field(..., description="The merge's parameters: the candidate's fixed ones and the searched.")
    state: Literal["complete", "failed", "repeat"] = Field(..., description=(
        "failed: `error` says why (the study went on); repeat: a setting proposed again, its scores copied."))
    objective: float | None = Field(None, description="The dev objective; null for a failed trial.")
    dev: list[dict[str, Any]] = Field(..., description=(
        "Metrics per dev set (caption_loss, perplexity, token_accuracy, exact_match, ...); null where a value "
        "was not a finite number."))
    seconds: float
    merge_s: float | None = None
    evaluate_s: float | None = None
    error: str | None = None
    worker: str | None = Field(None, description="The worker process that ran it; null for a repeat.")
    created_at: datetime


class TrialList(BaseModel):
    objective: Literal["loss", "accuracy", "qa"]
    direction: Literal["minimize", "maximize"]
    budget: int = Field(..., description="The trial budget asked for (a grid may be smaller).")
    best: int | None = Field(None, description=(
        "The best trial so far; once the job has succeeded, the one whose merge it wrote."))
    trials: list[TrialOut]


class ErrorOut(BaseModel):
    detail: str = Field(..., description="What went wrong, in one line.")
    field: str | None = Field(None, description="The offending field, when one is to blame.")


class ProgressOut(BaseModel):
    fraction: float = Field(..., ge=0, le=1)
    stage: str | None = Field(None, description="check, calibrate, merge, refit (second merge pass of gram_inputs: merged), write, evaluate, analyze, tune (a tuning's trials) or done.")
    layer: int | None = Field(None, description="The layer being merged.")
    message: str | None = None


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str = Field(..., description="The job's kind, as declared (workers.kinds): merge, analysis, tuning, ...")
    state: JobState
    spec: dict[str, Any] = Field(..., description="The spec (a tuning's: its request) as accepted, with defaults filled in.")
    progress: ProgressOut
    attempts: int = Field(..., description="Times a worker has started this job.")
    error: str | None = Field(None, description="Why the job failed.")
    labels: dict[str, str] = Field(default_factory=dict, description="The labels given when it was submitted.")
    priority: int = Field(0, description="Its order among its team's waiting jobs (higher first), as submitted.")
    queue_position: int | None = Field(None, ge=1, description=(
        "While `waiting`: 1 + the number of waiting jobs (of every team) expected to be handed to a worker before it, "
        "by the fair share across teams; null otherwise, or while its team's running cap is 0."))
    estimated_start: datetime | None = Field(None, description=(
        "While `waiting`: when a worker is expected to start it, replaying the fair share with each job taking its "
        "kind's mean duration of late (docs/service.md, Team queues); null otherwise, or while no worker is live."))
    deleted_at: datetime | None = Field(None, description="When its artifacts were deleted (DELETE or retention).")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; absent on the last.")


class EventOut(BaseModel):
    seq: int = Field(..., description="Sequence number within the job, from 1; the SSE event id.")
    type: str = Field(..., description="state, progress, attempt, lease, pushed, deleted, expired, or trial (a tuning's trial was recorded).")
    data: dict[str, Any]
    created_at: datetime


class EventPage(BaseModel):
    events: list[EventOut]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str = Field(..., description="Download path, relative to the API root.")


class ArtifactList(BaseModel):
    artifacts: list[ArtifactOut]


class MetricsOut(BaseModel):
    job_id: uuid.UUID
    state: JobState
    metrics: Evaluation | dict[str, Any] | None = Field(
        None, description="A merge's evaluation (when its spec lists `evaluate` datasets): model label ('merged', "
                          "and with evaluate_inputs 'base' and each expert) -> metrics per dataset, as in its "
                          "merge_report.json; an analysis's distance metrics; a tuning's chosen trial: `dev` (the scores that "
                          "chose it) and `test` (scored once, for it only); null until the job has succeeded "
                          "or when a merge evaluated nothing.")


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: AnyHttpUrl = Field(..., description="Where deliveries are POSTed; private addresses are refused unless the "
                                             "deployment allows them.")
    events: list[Literal["job.succeeded", "job.failed", "job.cancelled"]] = Field(
        ["job.succeeded", "job.failed", "job.cancelled"], min_length=1, description="The events to deliver.")


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    events: list[str]
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(..., description="Signs every delivery; shown only once.")


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class DeliveryOut(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    event: str
    state: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_response: str | None = Field(None, description="The start of the receiver's last answer.")
    last_attempt_at: datetime | None
    created_at: datetime


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryOut]


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
