"""The routes of every job kind, made from its declaration (workers.kinds): one generic create route,
list, get, delete, cancel, events, metrics, artifacts and downloads, with their OpenAPI documentation."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from workers.kinds import JobKind

from app.deps import SessionDep, SettingsDep, StoreDep, TeamDep
from app.errors import ERROR_RESPONSES, NOT_FOUND
from app.job_service import MAX_PRIORITY, MIN_PRIORITY, cancel_job, create_job, delete_job, jobs_out, list_jobs, load_job
from app.job_streaming import download_archive, download_artifact, job_events
from app.schemas import MAX_SEQ, ArtifactList, ArtifactOut, ErrorOut, JobOut, JobPage, MetricsOut
from service_core.models import Job, JobState


def job_metrics(job: Job) -> MetricsOut:
    return MetricsOut(job_id=job.id, state=job.state, metrics=job.metrics)


def job_artifacts(kind: JobKind, job: Job) -> ArtifactList:
    return ArtifactList(artifacts=[
        ArtifactOut(name=a.name, size=a.size, sha256=a.sha256, url=f"/v1/{kind.collection}/{job.id}/artifacts/{a.name}")
        for a in job.artifacts])


# Parameters and OpenAPI documentation of the job routes, the same for every kind.

IdempotencyKeyHeader = Annotated[str | None, Header(min_length=1, max_length=255, description=(
    "Makes retries safe: the same key and body return the same job (keys are per team)."))]
PageSizeQuery = Annotated[int, Query(ge=1, le=100)]
PageTokenQuery = Annotated[str | None, Query(description="next_page_token of the previous page.")]
LabelsQuery = Annotated[list[str] | None, Query(description=(
    "A label `key=value`; repeat for several. On a list: only jobs with every label given."))]
StatesQuery = Annotated[list[JobState] | None, Query(description="Only jobs in these states.")]
PriorityQuery = Annotated[int, Query(ge=MIN_PRIORITY, le=MAX_PRIORITY, description=(
    "Order among the team's own waiting jobs: higher starts first, equal ones oldest first. It does not move "
    "the job ahead of other teams' jobs: teams share the workers by weight (fair share)."))]
AfterSeqQuery = Annotated[int, Query(ge=0, le=MAX_SEQ, description="Only events with a larger seq.")]
LastEventIdHeader = Annotated[int | None, Header(ge=0, le=MAX_SEQ, description="SSE resume point.")]
ArtifactNamePath = Annotated[str, Path(max_length=255, pattern=r"^[^\x00]+$",
                                       description="The file's name, as listed by /artifacts.")]
RangeHeader = Annotated[str | None, Header(alias="Range")]
IfNoneMatchHeader = Annotated[str | None, Header()]

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def route_docs(kind: JobKind) -> dict[str, dict[str, Any]]:
    """Operation ids, summaries and documented responses of each job route of `resource`."""
    noun = kind.noun
    return {
        "create": dict(
            operation_id=f"create_{noun}", summary=f"Queue a {noun}",
            description="Validates the spec fully (schema, repos under the allowed roots, architectures and shapes) "
                        "before accepting. The job waits (`waiting`, with its `queue_position`) until the "
                        "dispatcher hands it to a worker by fair share across teams. A retry with the same "
                        "`Idempotency-Key` and body returns the same job.",
            responses={
                202: {"headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}},
                413: {"model": ErrorOut, "description": "Request body too large."},
                429: {"model": ErrorOut, "description": "The team's queue is full (the limit of waiting jobs is "
                                                        "named); see Retry-After.",
                      "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
            }),
        "list": dict(operation_id=f"list_{kind.collection}",
                     summary=f"List the team's {kind.collection}, newest first"),
        "get": dict(operation_id=f"get_{noun}", responses=NOT_FOUND, summary=f"Get a {noun}"),
        "cancel": dict(
            operation_id=f"cancel_{noun}", summary=f"Cancel a {noun}",
            description="A waiting or queued job is cancelled at once; a running one moves to `cancelling` until the "
                        "worker stops it and removes its partial output.",
            responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "The job has already finished."}}),
        "events": dict(
            operation_id=f"list_{noun}_events", summary=f"Events of a {noun}",
            description="Stored events in order. With `Accept: text/event-stream`, a Server-Sent Events stream that "
                        "follows the job until it finishes and resumes after `Last-Event-ID`.",
            responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}),
        "delete": dict(
            operation_id=f"delete_{noun}", summary=f"Delete a finished {noun}'s artifacts",
            description="Removes the stored files and marks the job deleted (`deleted_at`); the job record, its "
                        "events and metrics stay. Deleting again changes nothing.",
            responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "The job has not finished."}}),
        "archive": dict(
            operation_id=f"download_{noun}_archive", response_class=Response, summary="Download every file as one tar",
            description="A tar of all the artifacts, streamed as it is made (no size known in advance).",
            responses={**NOT_FOUND,
                       200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                       409: {"model": ErrorOut,
                             "description": "The job has not succeeded or its files were deleted."}}),
        "metrics": dict(operation_id=f"get_{noun}_metrics", responses=NOT_FOUND, summary=f"Metrics of a {noun}"),
        "artifacts": dict(operation_id=f"list_{noun}_artifacts", responses=NOT_FOUND,
                          summary=f"Files a {noun} produced", description="Empty until the job has succeeded."),
        "download": dict(
            operation_id=f"download_{noun}_artifact", response_class=Response, summary="Download a file",
            description="Supports `Range` (one range) and `If-None-Match`; the ETag is the quoted sha256 of the file.",
            responses={
                **NOT_FOUND,
                200: {"content": _BINARY},
                206: {"description": "The requested range.", "content": _BINARY},
                304: {"description": "Unchanged (If-None-Match matched)."},
                307: {"description": "S3 storage: fetch the file (Range included) from the presigned URL.",
                      "headers": {"Location": {"description": "Presigned URL.", "schema": {"type": "string"}}}},
                416: {"model": ErrorOut, "description": "Range outside the file, or not a bytes range."},
            }),
    }


def job_dependency(kind: JobKind) -> Any:
    """The dependency that loads the path's job of `kind` (team-scoped), for a kind's routes."""

    def load(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> Job:
        return load_job(session, team, kind, job_id)

    return Depends(load)


def job_router(kind: JobKind) -> APIRouter:
    """Every route of `kind` at /v1/<collection>: create, list, get, delete, cancel, events, metrics, artifacts."""
    router = APIRouter(prefix=f"/v1/{kind.collection}", tags=[kind.collection], responses=ERROR_RESPONSES)
    docs = route_docs(kind)
    # A default, not an Annotated alias: this module's annotations are strings, read in its globals
    # (keyword-only parameters, so the others need none).
    this_job = job_dependency(kind)

    def create(body: Any, request: Request, response: Response, session: SessionDep, team: TeamDep,
               settings: SettingsDep, idempotency_key: IdempotencyKeyHeader = None,
               label: LabelsQuery = None, priority: PriorityQuery = 0) -> JobOut:
        return create_job(kind, body, label, priority, idempotency_key, request, response, session, team, settings)

    create.__annotations__["body"] = kind.request  # the kind's request body, in the route and its OpenAPI schema
    router.post("", status_code=202, **docs["create"])(create)

    @router.get("", **docs["list"])
    def list_all(session: SessionDep, team: TeamDep, settings: SettingsDep, page_size: PageSizeQuery = 20,
                 page_token: PageTokenQuery = None, state: StatesQuery = None, label: LabelsQuery = None) -> JobPage:
        return list_jobs(kind, session, team, settings, page_size, page_token, state, label)

    @router.get("/{job_id}", **docs["get"])
    def get(*, job: Job = this_job, session: SessionDep, settings: SettingsDep) -> JobOut:
        return jobs_out(session, settings, [job])[0]

    @router.delete("/{job_id}", **docs["delete"])
    def delete(*, job: Job = this_job, session: SessionDep, store: StoreDep) -> JobOut:
        return delete_job(kind, session, store, job)

    @router.post("/{job_id}:cancel", **docs["cancel"])
    def cancel(*, job: Job = this_job, session: SessionDep) -> JobOut:
        return cancel_job(kind, session, job)

    @router.get("/{job_id}/events", **docs["events"])
    def events(*, job: Job = this_job, request: Request, session: SessionDep, after_seq: AfterSeqQuery = 0,
               last_event_id: LastEventIdHeader = None) -> Any:
        return job_events(job, request, session, after_seq, last_event_id)

    @router.get("/{job_id}/metrics", **docs["metrics"])
    def metrics(*, job: Job = this_job) -> MetricsOut:
        return job_metrics(job)

    @router.get("/{job_id}/artifacts", **docs["artifacts"])
    def artifacts(*, job: Job = this_job) -> ArtifactList:
        return job_artifacts(kind, job)

    @router.get("/{job_id}/artifacts:archive", **docs["archive"])
    def archive(*, job: Job = this_job, store: StoreDep) -> Response:
        return download_archive(kind, job, store)

    @router.get("/{job_id}/artifacts/{name}", **docs["download"])
    def download(*, job: Job = this_job, name: ArtifactNamePath, session: SessionDep, store: StoreDep,
                 range_header: RangeHeader = None, if_none_match: IfNoneMatchHeader = None) -> Response:
        return download_artifact(kind, job, name, session, store, range_header, if_none_match)

    return router
