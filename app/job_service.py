"""The job service: what every job kind shares behind its routes (app.job_routes).

Labels, idempotency, the team's quota of active jobs, the checks before a job is accepted, and
create, list, load, cancel and delete, for any kind declared in workers.kinds. A job of another kind,
of another team, or no job at all answer the same 404.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from fastapi import Request, Response
from pydantic import TypeAdapter
from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from pivotmerge.data.datasets import check_datasets
from pivotmerge.errors import PivotMergeError
from pivotmerge.spec.schema import MergeSpec, printable
from workers.celery_app import enqueue_job
from workers.kinds import JobKind

from app.errors import ApiError, field_named_in
from app.page_tokens import decode_page_token, encode_page_token
from app.schemas import JobOut, JobPage, ProgressOut
from core.job_states import add_event, request_cancel, transition
from core.models import ACTIVE_STATES, FINAL_STATES, Job, JobLabel, JobState, Team
from core.retention import remove_artifacts
from core.settings import Settings
from core.storage import ArtifactStore


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


def load_job(session: Session, team: Team, kind: JobKind, job_id: uuid.UUID) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id, Job.kind == kind.name))
    if job is None:
        raise ApiError(404, f"{kind.noun} {job_id} not found")
    return job


def as_json(kind: JobKind, body: Any) -> Any:
    """The request as the job keeps it: its `spec` column."""
    return TypeAdapter(kind.request).dump_python(body, mode="json")


def request_digest(kind: JobKind, body: Any, labels: dict[str, str]) -> str:
    """What makes two requests 'the same' for Idempotency-Key: kind, normalised body and labels."""
    canonical = json.dumps({"kind": kind.name, "spec": as_json(kind, body), "labels": labels}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _accepted(kind: JobKind, job: Job, response: Response) -> JobOut:
    response.headers["Location"] = f"/v1/{kind.collection}/{job.id}"
    return job_out(job)


def _replay(kind: JobKind, existing: Job, digest: str, response: Response) -> JobOut:
    if existing.request_sha256 != digest:
        raise ApiError(422, "Idempotency-Key: already used with a different request body", "Idempotency-Key")
    return _accepted(kind, existing, response)


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


def create_job(kind: JobKind, body: Any, labels: list[str] | None, idempotency_key: str | None,
               request: Request, response: Response, session: Session, team: Team, settings: Settings) -> JobOut:
    body = kind.accept(body, settings)
    label_map = parse_labels(labels)
    digest = request_digest(kind, body, label_map)
    if idempotency_key and (existing := _by_idempotency_key(session, team, idempotency_key)):
        return _replay(kind, existing, digest, response)

    active = session.scalar(select(func.count()).select_from(Job)
                            .where(Job.team_id == team.id, Job.state.in_(ACTIVE_STATES)))
    if active >= settings.max_active_jobs_per_team:
        raise ApiError(429, f"team has {active} active jobs, the limit is {settings.max_active_jobs_per_team}; "
                            "retry when one has finished", headers={"Retry-After": str(settings.retry_after_seconds)})

    spec = kind.spec_of(body)
    roots, downloads = settings.allowed_roots, settings.hub_allow_downloads
    with fields_under(kind.spec_field):
        check_push(kind, spec, settings)
        check_split(kind, spec)
        kind.check_spec(spec, allowed_roots=roots, allow_downloads=downloads)
    kind.check_request(body, allowed_roots=roots, allow_downloads=downloads)
    with fields_under(kind.spec_field):
        check_datasets(spec, allowed_roots=settings.allowed_roots)

    job = Job(team_id=team.id, kind=kind.name, spec=as_json(kind, body),
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
        return _replay(kind, existing, digest, response)
    add_event(session, job.id, "state", {"state": JobState.queued.value})
    session.commit()

    try:
        enqueue_job(request.app.state.celery, job.id)
    except Exception as exc:  # kombu raises many types for an unreachable broker
        transition(session, job.id, [JobState.queued], JobState.failed, error=f"could not queue the job: {exc}")
        session.commit()
        raise ApiError(503, "the job queue is unreachable; try again later") from exc
    return _accepted(kind, job, response)


def list_jobs(kind: JobKind, session: Session, team: Team, page_size: int, page_token: str | None,
              states: list[JobState] | None, labels: list[str] | None) -> JobPage:
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
    return JobPage(jobs=[job_out(j) for j in jobs], next_page_token=token)


def cancel_job(kind: JobKind, session: Session, job: Job) -> JobOut:
    refused = request_cancel(session, job.id) is None
    session.commit()
    # Re-read: the job may have finished between loading it and the cancel's UPDATE.
    session.refresh(job)
    if refused:
        raise ApiError(409, f"{kind.noun} {job.id} has already {job.state.value}; "
                            "only queued or running jobs can be cancelled")
    return job_out(job)


def delete_job(kind: JobKind, session: Session, store: ArtifactStore, job: Job) -> JobOut:
    if job.state not in FINAL_STATES:
        raise ApiError(409, f"{kind.noun} {job.id} is {job.state.value}; only finished jobs can be deleted "
                            "(cancel it first)")
    remove_artifacts(session, store, job.id, "deleted", {"reason": "deleted by the team"})
    session.commit()
    session.refresh(job)
    return job_out(job)


