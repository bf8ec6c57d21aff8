"""What merges, analyses and tunings share: all are jobs of the same shape.

The routes in app.routers.merges and app.routers.analyses are thin: each calls
one plain function here with its `JobResource` (the kind, its URL collection and
the check run before accepting); app.routers.tunings takes them all from
`add_job_routes`. A job of another kind, of another team, or no job at all
answer the same 404.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import tarfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from pivotmerge.data.datasets import check_datasets
from pivotmerge.errors import PivotMergeError
from pivotmerge.spec.schema import MergeSpec, printable
from workers.celery_app import enqueue_job

from app.deps import SessionDep, StoreDep, TeamDep
from app.downloads import etag_matches, parse_range
from app.errors import NOT_FOUND, ApiError, field_named_in
from app.page_tokens import decode_page_token, encode_page_token
from app.schemas import MAX_SEQ, ArtifactList, ErrorOut, ArtifactOut, EventOut, EventPage, JobOut, JobPage, MetricsOut, ProgressOut
from core.job_states import add_event, current_state, request_cancel, transition
from core.models import ACTIVE_STATES, FINAL_STATES, Artifact, Job, JobEvent, JobKind, JobLabel, JobState, Team
from core.retention import remove_artifacts
from core.settings import Settings
from core.storage import ArtifactStore

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
MAX_EVENTS_PER_PAGE = 1000


@dataclass(frozen=True)
class JobResource:
    """One kind of job as the API shows it: `/v1/<collection>/{id}`."""

    kind: JobKind
    collection: str
    noun: str
    preflight: Callable[..., None]  # refuses a request the worker could not run, before it is accepted
    # The request body's field holding the merge spec; None: the body is the spec.
    spec_field: str | None = None

    @property
    def a_noun(self) -> str:
        return f"{'an' if self.noun[0] in 'aeiou' else 'a'} {self.noun}"

    def spec_of(self, body: Any) -> MergeSpec:
        return body if self.spec_field is None else getattr(body, self.spec_field)


@contextmanager
def fields_under(prefix: str | None) -> Iterator[None]:
    """Errors raised inside, about the merge spec, name their field where the spec sits in the request body
    (`models.0.model` -> `spec.models.0.model`)."""
    if prefix is None:
        yield
        return
    try:
        yield
    except (ApiError, PivotMergeError) as exc:
        detail = exc.detail if isinstance(exc, ApiError) else str(exc)
        field = exc.field if isinstance(exc, ApiError) else field_named_in(detail)
        status = exc.status if isinstance(exc, ApiError) else 422
        raise ApiError(status, f"{prefix}.{detail}" if field else f"{prefix}: {detail}",
                       f"{prefix}.{field}" if field else prefix) from None


LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,62}", re.ASCII)
LABEL_VALUE = re.compile(r"[A-Za-z0-9_.\-]{0,63}", re.ASCII)
MAX_LABELS = 16


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    """`key=value` query values as a mapping; a 422 naming `label` for anything else."""
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
            raise ApiError(422, f"label: {printable(pair[:80])!r} is not key=value (key: 1-63 of a-z 0-9 _ . -, "
                                "starting with a letter or digit; value: up to 63 of A-Z a-z 0-9 _ . -)", "label")
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise ApiError(422, f"label: at most {MAX_LABELS} labels, got {len(labels)}", "label")
    return labels


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, spec=job.spec, attempts=job.attempts, error=job.error,
        labels={label.key: label.value for label in job.labels}, deleted_at=job.deleted_at,
        progress=ProgressOut(fraction=job.progress_fraction, stage=job.progress_stage, layer=job.progress_layer,
                             message=job.progress_message),
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
    )


def load_job(session: Session, team: Team, resource: JobResource, job_id: uuid.UUID) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id, Job.kind == resource.kind))
    if job is None:
        raise ApiError(404, f"{resource.noun} {job_id} not found")
    return job


def request_digest(kind: JobKind, body: BaseModel, labels: dict[str, str]) -> str:
    """What makes two requests 'the same' for Idempotency-Key: kind, normalised body and labels."""
    canonical = json.dumps({"kind": kind.value, "spec": body.model_dump(mode="json"), "labels": labels}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _accepted(resource: JobResource, job: Job, response: Response) -> JobOut:
    response.headers["Location"] = f"/v1/{resource.collection}/{job.id}"
    return job_out(job)


def _replay(resource: JobResource, existing: Job, digest: str, response: Response) -> JobOut:
    if existing.request_sha256 != digest:
        raise ApiError(422, "Idempotency-Key: already used with a different request body", "Idempotency-Key")
    return _accepted(resource, existing, response)


def _by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))


def check_push(resource: JobResource, spec: MergeSpec, settings: Settings) -> None:
    """push_to_hub needs a merge to push and the service's token (never one from the spec)."""
    if spec.push_to_hub is None:
        return
    if resource.kind is not JobKind.merge:
        raise ApiError(422, f"push_to_hub: only a merge can be pushed, not {resource.a_noun}", "push_to_hub")
    if settings.hub_token is None:
        raise ApiError(422, "push_to_hub: this service has no hub token (PIVOTMERGE_HUB_TOKEN), so it cannot push",
                       "push_to_hub")


def check_split(resource: JobResource, spec: MergeSpec) -> None:
    """Only a merge runs in parts (workers.split); an analysis with `split` would silently ignore it."""
    if spec.split is not None and resource.kind is not JobKind.merge:
        raise ApiError(422, f"split: only a merge can be split, not {resource.a_noun}", "split")


def create_job(resource: JobResource, body: BaseModel, labels: list[str] | None, idempotency_key: str | None,
               request: Request, response: Response, session: Session, team: Team, settings: Settings) -> JobOut:
    label_map = parse_labels(labels)
    digest = request_digest(resource.kind, body, label_map)
    if idempotency_key and (existing := _by_idempotency_key(session, team, idempotency_key)):
        return _replay(resource, existing, digest, response)

    active = session.scalar(select(func.count()).select_from(Job)
                            .where(Job.team_id == team.id, Job.state.in_(ACTIVE_STATES)))
    if active >= settings.max_active_jobs_per_team:
        raise ApiError(429, f"team has {active} active jobs, the limit is {settings.max_active_jobs_per_team}; "
                            "retry when one has finished", headers={"Retry-After": str(settings.retry_after_seconds)})

    spec = resource.spec_of(body)
    with fields_under(resource.spec_field):
        check_push(resource, spec, settings)
        check_split(resource, spec)
    resource.preflight(body, allowed_roots=settings.allowed_roots, allow_downloads=settings.hub_allow_downloads)
    with fields_under(resource.spec_field):
        check_datasets(spec, allowed_roots=settings.allowed_roots)

    job = Job(team_id=team.id, kind=resource.kind, spec=body.model_dump(mode="json"),
              idempotency_key=idempotency_key, request_sha256=digest,
              labels=[JobLabel(key=k, value=v) for k, v in sorted(label_map.items())])
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent retry with the same key won the insert
        session.rollback()
        existing = _by_idempotency_key(session, team, idempotency_key or "")
        if existing is None:
            raise
        return _replay(resource, existing, digest, response)
    add_event(session, job.id, "state", {"state": JobState.queued.value})
    session.commit()

    try:
        enqueue_job(request.app.state.celery, job.id)
    except Exception as exc:  # kombu raises many types for an unreachable broker
        transition(session, job.id, [JobState.queued], JobState.failed, error=f"could not queue the job: {exc}")
        session.commit()
        raise ApiError(503, "the job queue is unreachable; try again later") from exc
    return _accepted(resource, job, response)


def list_jobs(resource: JobResource, session: Session, team: Team, page_size: int, page_token: str | None,
              states: list[JobState] | None, labels: list[str] | None) -> JobPage:
    query = select(Job).where(Job.team_id == team.id, Job.kind == resource.kind).options(selectinload(Job.labels))
    if states:
        query = query.where(Job.state.in_(states))
    for key, value in parse_labels(labels).items():
        query = query.where(exists().where(JobLabel.job_id == Job.id, JobLabel.key == key, JobLabel.value == value))
    if page_token:
        created, last_id = decode_page_token(page_token)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size + 1)).all()
    more = len(jobs) > page_size
    jobs = jobs[:page_size]
    token = encode_page_token(jobs[-1].created_at, jobs[-1].id) if more else None
    return JobPage(jobs=[job_out(j) for j in jobs], next_page_token=token)


def cancel_job(resource: JobResource, session: Session, job: Job) -> JobOut:
    refused = request_cancel(session, job.id) is None
    session.commit()
    # Re-read: the job may have finished between loading it and the cancel's UPDATE.
    session.refresh(job)
    if refused:
        raise ApiError(409, f"{resource.noun} {job.id} has already {job.state.value}; "
                            "only queued or running jobs can be cancelled")
    return job_out(job)


def delete_job(resource: JobResource, session: Session, store: ArtifactStore, job: Job) -> JobOut:
    if job.state not in FINAL_STATES:
        raise ApiError(409, f"{resource.noun} {job.id} is {job.state.value}; only finished jobs can be deleted "
                            "(cancel it first)")
    remove_artifacts(session, store, job.id, "deleted", {"reason": "deleted by the team"})
    session.commit()
    session.refresh(job)
    return job_out(job)


def tar_stream(store: ArtifactStore, artifacts: list[Artifact], mtime: float) -> Iterator[bytes]:
    """A tar of the artifacts, produced as it is sent: a header, the file's bytes, padding, for each."""
    for artifact in artifacts:
        info = tarfile.TarInfo(artifact.name)
        info.size, info.mtime, info.mode = artifact.size, int(mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield from store.read(artifact.storage_key, 0, artifact.size)
        if artifact.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - artifact.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end-of-archive marker


def download_archive(resource: JobResource, job: Job, store: ArtifactStore) -> StreamingResponse:
    if job.state is not JobState.succeeded or not job.artifacts:
        raise ApiError(409, f"{resource.noun} {job.id} is {job.state.value} and has no artifacts to archive")
    mtime = (job.finished_at or job.created_at).timestamp()
    return StreamingResponse(tar_stream(store, list(job.artifacts), mtime), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{job.id}.tar"'})


def _events_after(make_session: sessionmaker[Session], job_id: uuid.UUID,
                  after_seq: int) -> tuple[JobState | None, list[EventOut]]:
    with make_session() as session:
        # State first: a final state is committed together with its event, so
        # when the state read is final, the event read below sees every event.
        state = current_state(session, job_id)
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                               .order_by(JobEvent.seq).limit(MAX_EVENTS_PER_PAGE)).all()
        return state, [EventOut.model_validate(e, from_attributes=True) for e in rows]


async def sse_events(make_session: sessionmaker[Session], job_id: uuid.UUID, after_seq: int) -> AsyncIterator[str]:
    """Stored events after `after_seq`, then new ones as they are written, until the job is final.

    A follower holds no thread while it waits: each poll borrows one for its
    two short queries, so hundreds of followers leave the other routes free.
    """
    idle = 0.0
    while True:
        state, events = await run_in_threadpool(_events_after, make_session, job_id, after_seq)
        for event in events:
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"
            after_seq = event.seq
        if events:
            idle = 0.0
            continue
        if state in FINAL_STATES or state is None:
            return
        await asyncio.sleep(SSE_POLL_SECONDS)
        idle += SSE_POLL_SECONDS
        if idle >= SSE_KEEPALIVE_SECONDS:  # keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


def job_events(job: Job, request: Request, session: Session, after_seq: int, last_event_id: int | None) -> Any:
    if "text/event-stream" in request.headers.get("accept", ""):
        start = last_event_id if last_event_id is not None else after_seq
        # The request's session would hold a pooled connection for the stream's whole life: give it back now.
        session.close()
        return StreamingResponse(sse_events(request.app.state.sessionmaker, job.id, start),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq > after_seq)
                           .order_by(JobEvent.seq).limit(MAX_EVENTS_PER_PAGE)).all()
    return EventPage(events=[EventOut.model_validate(e, from_attributes=True) for e in rows])


def job_metrics(job: Job) -> MetricsOut:
    return MetricsOut(job_id=job.id, state=job.state, metrics=job.metrics)


def job_artifacts(resource: JobResource, job: Job) -> ArtifactList:
    return ArtifactList(artifacts=[
        ArtifactOut(name=a.name, size=a.size, sha256=a.sha256, url=f"/v1/{resource.collection}/{job.id}/artifacts/{a.name}")
        for a in job.artifacts])


def download_artifact(resource: JobResource, job: Job, name: str, session: Session, store: ArtifactStore,
                      range_header: str | None, if_none_match: str | None) -> Response:
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise ApiError(404, f"{resource.noun} {job.id} has no artifact {name!r}")
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if if_none_match and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    if url := store.download_url(artifact.storage_key, artifact.name):
        return RedirectResponse(url, status_code=307, headers=headers)
    span = parse_range(range_header, artifact.size)
    start, end = span or (0, artifact.size)
    headers["Content-Length"] = str(end - start)
    headers["Content-Disposition"] = f'attachment; filename="{artifact.name}"'
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
    return StreamingResponse(store.read(artifact.storage_key, start, end), status_code=206 if span else 200,
                             media_type="application/octet-stream", headers=headers)


# Parameters and OpenAPI documentation of the job routes, the same for every kind.

IdempotencyKeyHeader = Annotated[str | None, Header(min_length=1, max_length=255, description=(
    "Makes retries safe: the same key and body return the same job (keys are per team)."))]
PageSizeQuery = Annotated[int, Query(ge=1, le=100)]
PageTokenQuery = Annotated[str | None, Query(description="next_page_token of the previous page.")]
LabelsQuery = Annotated[list[str] | None, Query(description=(
    "A label `key=value`; repeat for several. On a list: only jobs with every label given."))]
StatesQuery = Annotated[list[JobState] | None, Query(description="Only jobs in these states.")]
AfterSeqQuery = Annotated[int, Query(ge=0, le=MAX_SEQ, description="Only events with a larger seq.")]
LastEventIdHeader = Annotated[int | None, Header(ge=0, le=MAX_SEQ, description="SSE resume point.")]
ArtifactNamePath = Annotated[str, Path(max_length=255, pattern=r"^[^\x00]+$",
                                       description="The file's name, as listed by /artifacts.")]
RangeHeader = Annotated[str | None, Header(alias="Range")]
IfNoneMatchHeader = Annotated[str | None, Header()]

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def route_docs(resource: JobResource) -> dict[str, dict[str, Any]]:
    """Operation ids, summaries and documented responses of each job route of `resource`."""
    noun = resource.noun
    return {
        "create": dict(
            operation_id=f"create_{noun}", summary=f"Queue a {noun}",
            description="Validates the spec fully (schema, repos under the allowed roots, architectures and shapes) "
                        "before accepting. A retry with the same `Idempotency-Key` and body returns the same job.",
            responses={
                202: {"headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}},
                413: {"model": ErrorOut, "description": "Request body too large."},
                429: {"model": ErrorOut, "description": "Too many active jobs for this team; see Retry-After.",
                      "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
                503: {"model": ErrorOut, "description": "The job queue is unreachable."},
            }),
        "list": dict(operation_id=f"list_{resource.collection}", summary=f"List the team's {resource.collection}, newest first"),
        "get": dict(operation_id=f"get_{noun}", responses=NOT_FOUND, summary=f"Get a {noun}"),
        "cancel": dict(
            operation_id=f"cancel_{noun}", summary=f"Cancel a {noun}",
            description="A queued job is cancelled at once; a running one moves to `cancelling` until the "
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
            responses={**NOT_FOUND, 200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                       409: {"model": ErrorOut, "description": "The job has not succeeded or its files were deleted."}}),
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


def add_job_routes(router: APIRouter, resource: JobResource) -> Any:
    """Add every route of `resource` but its POST to `router`: list, get, delete, cancel, events, metrics,
    artifacts. Returns the dependency that loads the path's job (team-scoped), for the kind's own routes."""
    docs = route_docs(resource)

    def load(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> Job:
        return load_job(session, team, resource, job_id)

    # A default, not an Annotated alias: this module's annotations are strings, read in its globals
    # (keyword-only parameters, so the others need none).
    this_job = Depends(load)

    @router.get("", **docs["list"])
    def list_all(session: SessionDep, team: TeamDep, page_size: PageSizeQuery = 20, page_token: PageTokenQuery = None,
                 state: StatesQuery = None, label: LabelsQuery = None) -> JobPage:
        return list_jobs(resource, session, team, page_size, page_token, state, label)

    @router.get("/{job_id}", **docs["get"])
    def get(*, job: Job = this_job) -> JobOut:
        return job_out(job)

    @router.delete("/{job_id}", **docs["delete"])
    def delete(*, job: Job = this_job, session: SessionDep, store: StoreDep) -> JobOut:
        return delete_job(resource, session, store, job)

    @router.post("/{job_id}:cancel", **docs["cancel"])
    def cancel(*, job: Job = this_job, session: SessionDep) -> JobOut:
        return cancel_job(resource, session, job)

    @router.get("/{job_id}/events", **docs["events"])
    def events(*, job: Job = this_job, request: Request, session: SessionDep, after_seq: AfterSeqQuery = 0,
               last_event_id: LastEventIdHeader = None) -> Any:
        return job_events(job, request, session, after_seq, last_event_id)

    @router.get("/{job_id}/metrics", **docs["metrics"])
    def metrics(*, job: Job = this_job) -> MetricsOut:
        return job_metrics(job)

    @router.get("/{job_id}/artifacts", **docs["artifacts"])
    def artifacts(*, job: Job = this_job) -> ArtifactList:
        return job_artifacts(resource, job)

    @router.get("/{job_id}/artifacts:archive", **docs["archive"])
    def archive(*, job: Job = this_job, store: StoreDep) -> Response:
        return download_archive(resource, job, store)

    @router.get("/{job_id}/artifacts/{name}", **docs["download"])
    def download(*, job: Job = this_job, name: ArtifactNamePath, session: SessionDep, store: StoreDep,
                 range_header: RangeHeader = None, if_none_match: IfNoneMatchHeader = None) -> Response:
        return download_artifact(resource, job, name, session, store, range_header, if_none_match)

    return Annotated[Job, this_job]
