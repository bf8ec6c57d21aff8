"""The job service: what every job kind shares behind its routes (app.job_routes).

Labels, idempotency, the room in the team's queue, the checks before a job is accepted, and
create, list, load, cancel and delete, for any kind declared in workers.kinds. A job of another kind,
of another team, or no job at all answer the same 404.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Iterator, Sequence

from fastapi import Request, Response
from pydantic import TypeAdapter
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from pivotmerge.data.datasets import check_datasets
from pivotmerge.errors import PivotMergeError
from pivotmerge.spec.schema import MergeSpec, printable
from workers.kinds import JobKind

from app.errors import ApiError, field_named_in
from app.page_tokens import decode_page_token, encode_page_token
from app.schemas import JobOut, JobPage, ProgressOut
from service_core.job_states import add_event, request_cancel
from service_core.models import FINAL_STATES, Job, JobLabel, JobState, Team
from service_core.retention import remove_artifacts
from service_core.settings import Settings
from service_core.storage import ArtifactStore
from service_core.team_queues import forecast_waiting


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


# Wide enough for any ordering a team wants, small enough to stay an ordinary integer in every client.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


def job_out(job: Job, queue_position: int | None = None, estimated_start: datetime | None = None) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, state=job.state, spec=job.spec, attempts=job.attempts, error=job.error,
        labels={label.key: label.value for label in job.labels}, deleted_at=job.deleted_at, priority=job.priority,
        queue_position=queue_position, estimated_start=estimated_start,
        progress=ProgressOut(fraction=job.progress_fraction, stage=job.progress_stage, layer=job.progress_layer,
                             message=job.progress_message),
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
    )


def jobs_out(session: Session, settings: Settings, jobs: Sequence[Job]) -> list[JobOut]:
    """The jobs as the API shows them, a waiting one with its queue position and estimated start (each queue
    is forecast once, and only when one of the jobs waits in it: the queue of the deployment that accepted it)."""
    queues = {deployment: forecast_waiting(session, settings, deployment)
              for deployment in {job.deployment for job in jobs if job.state is JobState.waiting}}
    shown = []
    for job in jobs:
        now, forecasts, workers_live = queues.get(job.deployment, (None, {}, False))
        ahead = forecasts.get(job.id) if job.state is JobState.waiting else None
        if now is None or ahead is None:
            shown.append(job_out(job))
        else:
            shown.append(job_out(job, ahead.position,
                                 now + timedelta(seconds=ahead.start_in_seconds) if workers_live else None))
    return shown


def load_job(session: Session, team: Team, kind: JobKind, job_id: uuid.UUID) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id, Job.kind == kind.name))
    if job is None:
        raise ApiError(404, f"{kind.noun} {job_id} not found")
    return job


def as_json(kind: JobKind, body: Any) -> Any:
    """The request as the job keeps it: its `spec` column."""
    return TypeAdapter(kind.request).dump_python(body, mode="json")


def request_digest(kind: JobKind, body: Any, labels: dict[str, str], priority: int) -> str:
    """What makes two requests 'the same' for Idempotency-Key: kind, normalised body, labels and priority."""
    request = {"kind": kind.name, "spec": as_json(kind, body), "labels": labels}
    if priority:  # left out at its default, so requests accepted before priorities existed still match
        request["priority"] = priority
    canonical = json.dumps(request, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _accepted(kind: JobKind, job: Job, response: Response, session: Session, settings: Settings) -> JobOut:
    response.headers["Location"] = f"/v1/{kind.collection}/{job.id}"
    return jobs_out(session, settings, [job])[0]


def _replay(kind: JobKind, existing: Job, digest: str, response: Response, session: Session,
            settings: Settings) -> JobOut:
    if existing.request_sha256 != digest:
        raise ApiError(422, "Idempotency-Key: already used with a different request body", "Idempotency-Key")
    return _accepted(kind, existing, response, session, settings)


def _by_idempotency_key(session: Session, team: Team, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))


def check_push(kind: JobKind, spec: MergeSpec, settings: Settings) -> None:
    """push_to_hub needs a kind whose output is a model (a merge) and the service's token (never one from the spec)."""
    if spec.push_to_hub is None:
        return
    if not kind.can_push:
        raise ApiError(422, f"push_to_hub: only a merge can be pushed, not {kind.a_noun}", "push_to_hub")
    if settings.hub_token is None:
        raise ApiError(422, "push_to_hub: this service has no hub token (PIVOTMERGE_HUB_TOKEN), so it cannot push",
                       "push_to_hub")


def check_split(kind: JobKind, spec: MergeSpec) -> None:
    """Only a kind that can split (a merge) runs in parts (workers.split_parts); another would ignore `split`."""
    if spec.split is not None and not kind.can_split:
        raise ApiError(422, f"split: only a merge can be split, not {kind.a_noun}", "split")


def check_queue_room(session: Session, team: Team, settings: Settings) -> None:
    """A team's queue holds at most `max_waiting_jobs_per_team` waiting jobs; its jobs on workers do not count."""
    waiting = session.scalar(select(func.count()).select_from(Job)
                             .where(Job.team_id == team.id, Job.state == JobState.waiting))
    if waiting >= settings.max_waiting_jobs_per_team:
        raise ApiError(429, f"team has {waiting} waiting jobs, the limit is {settings.max_waiting_jobs_per_team} "
                            "(PIVOTMERGE_MAX_WAITING_JOBS_PER_TEAM); retry when some have started",
                       headers={"Retry-After": str(settings.retry_after_seconds)})


def create_job(kind: JobKind, body: Any, labels: list[str] | None, priority: int, idempotency_key: str | None,
               request: Request, response: Response, session: Session, team: Team, settings: Settings) -> JobOut:
    body = kind.accept(body, settings)
    label_map = parse_labels(labels)
    digest = request_digest(kind, body, label_map, priority)
    if idempotency_key and (existing := _by_idempotency_key(session, team, idempotency_key)):
        return _replay(kind, existing, digest, response, session, settings)
    check_queue_room(session, team, settings)

    merge_spec = kind.merge_spec_of(body)
    roots, downloads = settings.allowed_roots, settings.hub_allow_downloads
    with fields_under(kind.spec_field):
        if merge_spec is not None:
            check_push(kind, merge_spec, settings)
            check_split(kind, merge_spec)
        kind.check_spec(kind.spec_of(body), allowed_roots=roots, allow_downloads=downloads)
    kind.check_request(body, allowed_roots=roots, allow_downloads=downloads)
    if merge_spec is not None:
        with fields_under(kind.spec_field):
            check_datasets(merge_spec, allowed_roots=settings.allowed_roots)

    job = Job(team_id=team.id, kind=kind.name, spec=as_json(kind, body), state=JobState.waiting, priority=priority,
              deployment=settings.broker_key_prefix, idempotency_key=idempotency_key, request_sha256=digest,
              labels=[JobLabel(key=k, value=v) for k, v in sorted(label_map.items())])
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent retry with the same key won the insert
        session.rollback()
        existing = _by_idempotency_key(session, team, idempotency_key or "")
        if existing is None:
            raise
        return _replay(kind, existing, digest, response, session, settings)
    add_event(session, job.id, "state", {"state": JobState.waiting.value})
    session.commit()
    request.app.state.wake_dispatcher()  # a free worker need not wait for the dispatcher's next tick
    return _accepted(kind, job, response, session, settings)


def list_jobs(kind: JobKind, session: Session, team: Team, settings: Settings, page_size: int,
              page_token: str | None, states: list[JobState] | None, labels: list[str] | None) -> JobPage:
    query = select(Job).where(Job.team_id == team.id, Job.kind == kind.name).options(selectinload(Job.labels))
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
    return JobPage(jobs=jobs_out(session, settings, jobs), next_page_token=token)


def cancel_job(kind: JobKind, session: Session, job: Job) -> JobOut:
    refused = request_cancel(session, job.id) is None
    session.commit()
    # Re-read: the job may have finished between loading it and the cancel's UPDATE.
    session.refresh(job)
    if refused:
        raise ApiError(409, f"{kind.noun} {job.id} has already {job.state.value}; "
                            "only waiting, queued or running jobs can be cancelled")
    return job_out(job)


def delete_job(kind: JobKind, session: Session, store: ArtifactStore, job: Job) -> JobOut:
    if job.state not in FINAL_STATES:
        raise ApiError(409, f"{kind.noun} {job.id} is {job.state.value}; only finished jobs can be deleted "
                            "(cancel it first)")
    remove_artifacts(session, store, job.id, "deleted", {"reason": "deleted by the team"})
    session.commit()
    session.refresh(job)
    return job_out(job)


