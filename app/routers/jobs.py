"""Routes shared by every job resource: merges and analyses have the same shape.

`job_router(kind, ...)` builds the routes for one kind; a job of another kind, of
another team, or no job at all answer the same 404.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from datetime import datetime
from typing import Annotated, Any, Iterator

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

import pivotmerge
from pivotmerge.analysis.analyze import check_analysis
from pivotmerge.spec.schema import MergeSpec
from workers.celery_app import enqueue_job

from app.deps import SessionDep, SettingsDep, StoreDep, TeamDep
from app.errors import ERROR_RESPONSES, NOT_FOUND, ApiError
from core.job_states import add_event, current_state, request_cancel, transition
from core.models import ACTIVE_STATES, FINAL_STATES, Artifact, Job, JobEvent, JobKind, JobState, Team
from app.schemas import MAX_SEQ, ArtifactList, ArtifactOut, ErrorOut, EventOut, EventPage, JobOut, JobPage, MetricsOut, ProgressOut, SpecBody

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
MAX_EVENTS_PER_PAGE = 1000


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, spec=job.spec, attempts=job.attempts, error=job.error,
        progress=ProgressOut(fraction=job.progress_fraction, stage=job.progress_stage, layer=job.progress_layer,
                             message=job.progress_message),
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
    )


def request_digest(kind: JobKind, spec: MergeSpec) -> str:
    """What makes two requests 'the same' for Idempotency-Key: kind and normalised spec."""
    canonical = json.dumps({"kind": kind.value, "spec": spec.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_page_token(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, TypeError) as exc:  # binascii.Error and JSONDecodeError are ValueErrors
        raise ApiError(422, "page_token: not a token this API returned", "page_token") from exc


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (start, end exclusive); None for the whole file.

    Malformed or multi-range headers are ignored (RFC 9110 allows serving the
    whole representation); a well-formed range past the end answers 416.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].strip().partition("-")
    if not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:  # suffix range: the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        raise ApiError(416, f"range {header!r} is outside the file's {size} bytes",
                       headers={"Content-Range": f"bytes */{size}"})
    return start, end


def etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def sse_events(make_session: sessionmaker[Session], job_id: uuid.UUID, after_seq: int) -> Iterator[str]:
    """Stored events after `after_seq`, then new ones as they are written, until the job is final."""
    idle = 0.0
    while True:
        with make_session() as session:
            # State first: a final state is committed together with its event, so
            # when the state read is final, the event read below sees every event.
            state = current_state(session, job_id)
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
                                     .order_by(JobEvent.seq).limit(MAX_EVENTS_PER_PAGE)).all()
        for event in events:
            payload = EventOut.model_validate(event, from_attributes=True).model_dump_json()
            yield f"id: {event.seq}\nevent: {event.type}\ndata: {payload}\n\n"
            after_seq = event.seq
        if events:
            idle = 0.0
            continue
        if state in FINAL_STATES or state is None:
            return
        time.sleep(SSE_POLL_SECONDS)
        idle += SSE_POLL_SECONDS
        if idle >= SSE_KEEPALIVE_SECONDS:  # keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


def job_router(kind: JobKind, collection: str, noun: str) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{collection}", tags=[collection], responses=ERROR_RESPONSES)
    # An analysis also needs two models to compare; the engine checks everything else.
    preflight = pivotmerge.check if kind == JobKind.merge else check_analysis

    def load(session: Session, team: Team, job_id: uuid.UUID) -> Job:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id, Job.kind == kind))
        if job is None:
            raise ApiError(404, f"{noun} {job_id} not found")
        return job

    def accepted(job: Job, response: Response) -> JobOut:
        response.headers["Location"] = f"/v1/{collection}/{job.id}"
        return job_out(job)

    def replay(existing: Job, digest: str, response: Response) -> JobOut:
        if existing.request_sha256 != digest:
            raise ApiError(422, "Idempotency-Key: already used with a different request body", "Idempotency-Key")
        return accepted(existing, response)

    def by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
        return session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))

    @router.post(
        "", status_code=202, operation_id=f"create_{noun}",
        summary=f"Queue a {noun}",
        description="Validates the spec fully (schema, repos under the allowed roots, architectures and shapes) "
                    "before accepting. A retry with the same `Idempotency-Key` and body returns the same job.",
        responses={
            202: {"headers": {"Location": {"description": "The job's URL.", "schema": {"type": "string"}}}},
            413: {"model": ErrorOut, "description": "Request body too large."},
            429: {"model": ErrorOut, "description": "Too many active jobs for this team; see Retry-After.",
                  "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},
            503: {"model": ErrorOut, "description": "The job queue is unreachable."},
        },
    )
    def create(spec: SpecBody, request: Request, response: Response, session: SessionDep, team: TeamDep,
               settings: SettingsDep,
               idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255, description=(
                   "Makes retries safe: the same key and body return the same job (keys are per team)."))] = None,
               ) -> JobOut:
        digest = request_digest(kind, spec)
        if idempotency_key and (existing := by_idempotency_key(session, team, idempotency_key)):
            return replay(existing, digest, response)

        active = session.scalar(select(func.count()).select_from(Job)
                                .where(Job.team_id == team.id, Job.state.in_(ACTIVE_STATES)))
        if active >= settings.max_active_jobs_per_team:
            raise ApiError(429, f"team has {active} active jobs, the limit is {settings.max_active_jobs_per_team}; "
                                "retry when one has finished", headers={"Retry-After": str(settings.retry_after_seconds)})

        preflight(spec, allowed_roots=settings.allowed_roots)

        job = Job(team_id=team.id, kind=kind, spec=spec.model_dump(mode="json"), idempotency_key=idempotency_key,
                  request_sha256=digest)
        session.add(job)
        try:
            session.flush()
        except IntegrityError:  # a concurrent retry with the same key won the insert
            session.rollback()
            existing = by_idempotency_key(session, team, idempotency_key or "")
            if existing is None:
                raise
            return replay(existing, digest, response)
        add_event(session, job.id, "state", {"state": JobState.queued.value})
        session.commit()

        try:
            enqueue_job(request.app.state.celery, job.id)
        except Exception as exc:  # kombu raises many types for an unreachable broker
            transition(session, job.id, [JobState.queued], JobState.failed, error=f"could not queue the job: {exc}")
            session.commit()
            raise ApiError(503, "the job queue is unreachable; try again later") from exc
        return accepted(job, response)

    @router.get("", operation_id=f"list_{noun}s", summary=f"List the team's {noun}s, newest first")
    def list_jobs(session: SessionDep, team: TeamDep,
                  page_size: Annotated[int, Query(ge=1, le=100)] = 20,
                  page_token: Annotated[str | None, Query(description="next_page_token of the previous page.")] = None,
                  state: Annotated[list[JobState] | None, Query(description="Only jobs in these states.")] = None,
                  ) -> JobPage:
        query = select(Job).where(Job.team_id == team.id, Job.kind == kind)
        if state:
            query = query.where(Job.state.in_(state))
        if page_token:
            created, last_id = decode_page_token(page_token)
            query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
        jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(page_size + 1)).all()
        more = len(jobs) > page_size
        jobs = jobs[:page_size]
        return JobPage(jobs=[job_out(j) for j in jobs], next_page_token=encode_page_token(jobs[-1]) if more else None)

    @router.get("/{job_id}", operation_id=f"get_{noun}", responses=NOT_FOUND, summary=f"Get a {noun}")
    def get_job(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> JobOut:
        return job_out(load(session, team, job_id))

    @router.post("/{job_id}:cancel", operation_id=f"cancel_{noun}", summary=f"Cancel a {noun}",
                 description="A queued job is cancelled at once; a running one moves to `cancelling` until the "
                             "worker stops it and removes its partial output.",
                 responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "The job has already finished."}})
    def cancel(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> JobOut:
        job = load(session, team, job_id)
        if request_cancel(session, job.id) is None:
            raise ApiError(409, f"{noun} {job_id} has already {job.state.value}; only queued or running jobs can be cancelled")
        session.commit()
        session.refresh(job)
        return job_out(job)

    @router.get(
        "/{job_id}/events", operation_id=f"list_{noun}_events", summary=f"Events of a {noun}",
        description="Stored events in order. With `Accept: text/event-stream`, a Server-Sent Events stream that "
                    "follows the job until it finishes and resumes after `Last-Event-ID`.",
        responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    )
    def events(job_id: uuid.UUID, request: Request, session: SessionDep, team: TeamDep,
               after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ, description="Only events with a larger seq.")] = 0,
               last_event_id: Annotated[int | None, Header(ge=0, le=MAX_SEQ, description="SSE resume point.")] = None,
               ) -> Any:
        job = load(session, team, job_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            start = last_event_id if last_event_id is not None else after_seq
            return StreamingResponse(sse_events(request.app.state.sessionmaker, job.id, start),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq > after_seq)
                               .order_by(JobEvent.seq).limit(MAX_EVENTS_PER_PAGE)).all()
        return EventPage(events=[EventOut.model_validate(e, from_attributes=True) for e in rows])

    @router.get("/{job_id}/metrics", operation_id=f"get_{noun}_metrics", responses=NOT_FOUND,
                summary=f"Metrics of a {noun}")
    def metrics(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> MetricsOut:
        job = load(session, team, job_id)
        return MetricsOut(job_id=job.id, state=job.state, metrics=job.metrics)

    def artifact_out(job: Job, artifact: Artifact) -> ArtifactOut:
        return ArtifactOut(name=artifact.name, size=artifact.size, sha256=artifact.sha256,
                           url=f"/v1/{collection}/{job.id}/artifacts/{artifact.name}")

    @router.get("/{job_id}/artifacts", operation_id=f"list_{noun}_artifacts", responses=NOT_FOUND,
                summary=f"Files a {noun} produced", description="Empty until the job has succeeded.")
    def artifacts(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> ArtifactList:
        job = load(session, team, job_id)
        return ArtifactList(artifacts=[artifact_out(job, a) for a in job.artifacts])

    @router.get(
        "/{job_id}/artifacts/{name}", operation_id=f"download_{noun}_artifact", response_class=Response,
        summary="Download a file", description="Supports `Range` (one range) and `If-None-Match`; the ETag is the "
                                               "quoted sha256 of the file.",
        responses={
            **NOT_FOUND,
            200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            206: {"description": "The requested range.",
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            304: {"description": "Unchanged (If-None-Match matched)."},
            416: {"model": ErrorOut, "description": "Range outside the file."},
        },
    )
    def download(job_id: uuid.UUID, name: str, session: SessionDep, team: TeamDep, store: StoreDep,
                 range_header: Annotated[str | None, Header(alias="Range")] = None,
                 if_none_match: Annotated[str | None, Header()] = None) -> Response:
        job = load(session, team, job_id)
        artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
        if artifact is None:
            raise ApiError(404, f"{noun} {job_id} has no artifact {name!r}")
        etag = f'"{artifact.sha256}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if if_none_match and etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        span = parse_range(range_header, artifact.size)
        start, end = span or (0, artifact.size)
        headers["Content-Length"] = str(end - start)
        headers["Content-Disposition"] = f'attachment; filename="{artifact.name}"'
        if span:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
        return StreamingResponse(store.read(artifact.storage_key, start, end), status_code=206 if span else 200,
                                 media_type="application/octet-stream",
                                 headers=headers)

    return router
