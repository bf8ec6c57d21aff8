"""What job routes stream: a tar of the artifacts made as it is sent, the events as Server-Sent Events,
and one artifact with Range and ETag."""

from __future__ import annotations

import asyncio
import tarfile
import uuid
from typing import Any, AsyncIterator, Iterator

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from workers.kinds import JobKind

from app.downloads import etag_matches, parse_range
from app.errors import ApiError
from app.schemas import EventOut, EventPage
from core.job_states import current_state
from core.models import FINAL_STATES, Artifact, Job, JobEvent, JobState
from core.storage import ArtifactStore

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
MAX_EVENTS_PER_PAGE = 1000


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


def download_archive(kind: JobKind, job: Job, store: ArtifactStore) -> StreamingResponse:
    if job.state is not JobState.succeeded or not job.artifacts:
        raise ApiError(409, f"{kind.noun} {job.id} is {job.state.value} and has no artifacts to archive")
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


def download_artifact(kind: JobKind, job: Job, name: str, session: Session, store: ArtifactStore,
                      range_header: str | None, if_none_match: str | None) -> Response:
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if artifact is None:
        raise ApiError(404, f"{kind.noun} {job.id} has no artifact {name!r}")
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
