"""The job state machine, shared by the API and the workers.

Every transition is one conditional UPDATE (``WHERE state IN (...)``), so an API
cancel and a worker finishing at the same moment cannot overwrite each other:
exactly one of them wins and the other sees that it lost.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, Iterable, NamedTuple

from sqlalchemy import ColumnElement, and_, func, or_, select, true, update
from sqlalchemy.orm import Session

from service_core.models import FINAL_STATES, Job, JobEvent, JobState, utcnow
from service_core.webhooks import record_deliveries


def add_event(session: Session, job_id: uuid.UUID, type: str, data: dict[str, Any]) -> JobEvent:
    # Bumping the job's counter serialises event numbering per job on every backend.
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(last_event_seq=Job.last_event_seq + 1).returning(Job.last_event_seq)
    ).scalar_one()
    event = JobEvent(job_id=job_id, seq=seq, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def transition(session: Session, job_id: uuid.UUID, from_states: Iterable[JobState], to: JobState, *,
               only_if: ColumnElement[bool] | None = None, **values: Any) -> bool:
    """Move the job to `to` if it is in one of `from_states` (and `only_if` holds); record a state event.

    True if it moved.
    """
    now = utcnow()
    if to in FINAL_STATES:
        values.setdefault("finished_at", now)
        values.setdefault("lease_expires_at", None)
    moved = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(list(from_states)), true() if only_if is None else only_if)
        .values(state=to, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved:
        data: dict[str, Any] = {"state": to.value}
        if values.get("error"):
            data["error"] = values["error"]
        add_event(session, job_id, "state", data)
        if to in FINAL_STATES:
            record_deliveries(session, job_id, to)
    return bool(moved)


def current_state(session: Session, job_id: uuid.UUID) -> JobState | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


def request_cancel(session: Session, job_id: uuid.UUID) -> JobState | None:
    """Cancel a waiting or queued job at once, or ask a running one to stop. Returns the new state, None if final."""
    if transition(session, job_id, [JobState.waiting, JobState.queued], JobState.cancelled):
        return JobState.cancelled
    if transition(session, job_id, [JobState.running], JobState.cancelling):
        return JobState.cancelling
    state = current_state(session, job_id)
    return JobState.cancelling if state is JobState.cancelling else None


def holds_lease(attempt: int) -> ColumnElement[bool]:
    """The job is still the given attempt's: not requeued or taken over since it started."""
    return Job.attempts == attempt


def runs_as(session: Session, job_id: uuid.UUID, attempt: int) -> bool:
    """The job is `running` as `attempt`: that attempt's work goes on; a cancel, a requeue or an end stops it."""
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.state == JobState.running,
                                               holds_lease(attempt))) is not None


def owner_gone(dead_owner: str | None = None) -> ColumnElement[bool]:
    """The worker holding the job stopped renewing its lease, or is known to be dead."""
    gone = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < utcnow())
    return or_(gone, Job.worker == dead_owner) if dead_owner else gone


def start_attempt(session: Session, job_id: uuid.UUID, worker: str, max_attempts: int, lease_seconds: int,
                  dead_owner: str | None = None) -> int | None:
    """Take the job for `worker` and mark it running; the attempt number, or None if it must not run it.

    A queued job is taken. A `running` job is taken over only when its owner is
    gone (its lease lapsed, or `dead_owner` names it: a process on this host
    that no longer exists); otherwise this delivery is a duplicate of a job
    another worker holds, and is dropped. Each start counts; once the count
    passes `max_attempts` the job is failed instead of started again, so a job
    that kills its worker (out of memory, a segfault) is not retried forever.
    """
    now = utcnow()
    row = session.execute(
        update(Job).where(Job.id == job_id, or_(Job.state == JobState.queued,
                                                and_(Job.state == JobState.running, owner_gone(dead_owner))))
        .values(attempts=Job.attempts + 1, worker=worker, updated_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.attempts, Job.state)
    ).first()
    if row is None:
        # Cancelled while queued, its worker died while a cancel was in flight, or another worker holds it.
        transition(session, job_id, [JobState.cancelling], JobState.cancelled, only_if=owner_gone(dead_owner))
        return None
    attempts, state = row
    if attempts > max_attempts:
        transition(session, job_id, [JobState.queued, JobState.running], JobState.failed,
                   error=f"the worker running this job died {attempts - 1} times (limit: {max_attempts} attempts); "
                         "the job may need more memory or time than a worker has")
        return None
    if state is JobState.running:
        add_event(session, job_id, "attempt", {"attempt": attempts, "message": "restarted: the previous worker died"})
    transition(session, job_id, [JobState.queued, JobState.running], JobState.running,
               started_at=func.coalesce(Job.started_at, now))
    return attempts


def renew_lease(session: Session, job_id: uuid.UUID, attempt: int, lease_seconds: int) -> bool:
    """Extend the attempt's lease; False when the job is no longer this attempt's to run."""
    return bool(session.execute(
        update(Job).where(Job.id == job_id, holds_lease(attempt), Job.state.in_([JobState.running, JobState.cancelling]))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount)


class Reaped(NamedTuple):
    requeued: list[uuid.UUID]  # for the caller to send to the queue once this is committed
    ended: list[uuid.UUID]  # cancelled or failed: whatever their dead attempt stored must go


def reap_lapsed_leases(session: Session, max_attempts: int) -> Reaped:
    """Jobs whose worker stopped renewing the lease: requeue them, or fail them past `max_attempts`.

    A cancel in flight ends `cancelled`. Each move is a conditional UPDATE, so
    several reapers (API processes) never double-handle a job.
    """
    lapsed = session.execute(select(Job.id, Job.state, Job.attempts).where(
        Job.state.in_([JobState.running, JobState.cancelling]), Job.lease_expires_at < utcnow())).all()
    reaped = Reaped([], [])
    for job_id, state, attempts in lapsed:
        still_lapsed = and_(holds_lease(attempts), owner_gone())
        if state is JobState.cancelling:
            if transition(session, job_id, [state], JobState.cancelled, only_if=still_lapsed):
                reaped.ended.append(job_id)
        elif attempts >= max_attempts:
            if transition(session, job_id, [state], JobState.failed, only_if=still_lapsed,
                          error=f"the worker running this job stopped answering {attempts} times (limit: "
                                f"{max_attempts} attempts); the job may need more memory or time than a worker has"):
                reaped.ended.append(job_id)
        elif transition(session, job_id, [state], JobState.queued, only_if=still_lapsed, worker=None,
                        lease_expires_at=None, dispatched_at=utcnow(), sent_at=None):
            add_event(session, job_id, "lease", {"attempt": attempts, "message": "requeued: the worker stopped renewing its lease"})
            reaped.requeued.append(job_id)
    return reaped
