"""A split merge's parts as rows (core.models.SplitPart), leased as jobs are (core.job_states).

The job's worker writes a row per part and sends a task per row (workers.split_parts); the worker that
takes a part starts it with a conditional UPDATE, renews its lease while it merges, and ends it. Every
write of a part's worker is fenced by the job's attempt and by its own name, so a part the job's worker
has sent again, or one of an attempt the job no longer runs, writes nothing more.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, Sequence

from sqlalchemy import ColumnElement, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from core.models import SplitPart, utcnow

ENDED = ("succeeded", "stopped", "failed")


def create_parts(session: Session, job_id: uuid.UUID, attempt: int, parts: Sequence[list[int]]) -> None:
    """The attempt's parts, queued; rows of an earlier attempt are replaced."""
    session.execute(delete(SplitPart).where(SplitPart.job_id == job_id))
    session.add_all(SplitPart(job_id=job_id, part=i, job_attempt=attempt, shards=shards, state="queued", sends=0,
                              starts=0, done=0, total=0) for i, shards in enumerate(parts))
    session.flush()


def _this_part(job_id: uuid.UUID, part: int, attempt: int) -> ColumnElement[bool]:
    return and_(SplitPart.job_id == job_id, SplitPart.part == part, SplitPart.job_attempt == attempt)


def lease_lapsed(dead_owner: str | None = None) -> ColumnElement[bool]:
    """The part's worker stopped renewing its lease, or is known to be dead."""
    lapsed = or_(SplitPart.lease_expires_at.is_(None), SplitPart.lease_expires_at < utcnow())
    return or_(lapsed, SplitPart.worker == dead_owner) if dead_owner else lapsed


def sent(session: Session, job_id: uuid.UUID, part: int, attempt: int, task_id: str) -> None:
    session.execute(update(SplitPart).where(_this_part(job_id, part, attempt))
                    .values(task_id=task_id, sends=SplitPart.sends + 1))


def start_part(session: Session, job_id: uuid.UUID, part: int, attempt: int, worker: str, lease_seconds: int,
               max_attempts: int, dead_owner: str | None = None) -> SplitPart | None:
    """Take the part for `worker`: a queued one, or a running one whose worker is gone (`dead_owner`: a
    process of this host that no longer exists, whose task came back at once). None: not this delivery's,
    or started too often already (then it fails, as a job whose worker keeps dying does)."""
    now = utcnow()
    taken = session.execute(
        update(SplitPart).where(_this_part(job_id, part, attempt), or_(
            SplitPart.state == "queued", and_(SplitPart.state == "running", lease_lapsed(dead_owner))))
        .values(state="running", worker=worker, starts=SplitPart.starts + 1, done=0, total=0, updated_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(SplitPart.starts)).first()
    if taken is None:
        return None
    if taken.starts > max_attempts:
        end_part(session, job_id, part, attempt, worker, "failed",
                 message=f"the worker running it died {taken.starts - 1} times (limit: {max_attempts} attempts)")
        return None
    return session.get(SplitPart, (job_id, part))


def _runs_on(job_id: uuid.UUID, part: int, attempt: int, worker: str) -> ColumnElement[bool]:
    return and_(_this_part(job_id, part, attempt), SplitPart.state == "running", SplitPart.worker == worker)


def renew_part(session: Session, job_id: uuid.UUID, part: int, attempt: int, worker: str, lease_seconds: int,
               done: int, total: int) -> bool:
    """Extend the part's lease and record its progress; False once the part is no longer this worker's."""
    return bool(session.execute(
        update(SplitPart).where(_runs_on(job_id, part, attempt, worker))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds), done=done, total=total)
        .execution_options(synchronize_session=False)).rowcount)


def end_part(session: Session, job_id: uuid.UUID, part: int, attempt: int, worker: str, state: str, *,
             result: dict[str, Any] | None = None, message: str | None = None) -> bool:
    """Record how the worker's run of the part ended (one of ENDED); False if it was no longer its run."""
    assert state in ENDED
    return bool(session.execute(
        update(SplitPart).where(_runs_on(job_id, part, attempt, worker))
        .values(state=state, result=result, message=message, lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount)


def requeue_lapsed(session: Session, job_id: uuid.UUID, part: int, attempt: int, worker: str | None) -> bool:
    """Put back a running part whose worker stopped renewing its lease, to be sent again; False if it moved on."""
    return bool(session.execute(
        update(SplitPart).where(_this_part(job_id, part, attempt), SplitPart.state == "running",
                                SplitPart.worker == worker, lease_lapsed())
        .values(state="queued", lease_expires_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)).rowcount)


def parts_of(session: Session, job_id: uuid.UUID, attempt: int) -> list[SplitPart]:
    return list(session.scalars(select(SplitPart).where(SplitPart.job_id == job_id, SplitPart.job_attempt == attempt)
                                .order_by(SplitPart.part)))
