"""The job state machine, shared by the API and the workers.

Every transition is one conditional UPDATE (``WHERE state IN (...)``), so an API
cancel and a worker finishing at the same moment cannot overwrite each other:
exactly one of them wins and the other sees that it lost.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.models import FINAL_STATES, Job, JobEvent, JobState, utcnow


def add_event(session: Session, job_id: uuid.UUID, type: str, data: dict[str, Any]) -> JobEvent:
    # Bumping the job's counter serialises event numbering per job on every backend.
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(last_event_seq=Job.last_event_seq + 1).returning(Job.last_event_seq)
    ).scalar_one()
    event = JobEvent(job_id=job_id, seq=seq, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def transition(session: Session, job_id: uuid.UUID, from_states: Iterable[JobState], to: JobState,
               **values: Any) -> bool:
    """Move the job to `to` if it is in one of `from_states`; record a state event. True if it moved."""
    now = utcnow()
    if to in FINAL_STATES:
        values.setdefault("finished_at", now)
    moved = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(list(from_states)))
        .values(state=to, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved:
        data: dict[str, Any] = {"state": to.value}
        if values.get("error"):
            data["error"] = values["error"]
        add_event(session, job_id, "state", data)
    return bool(moved)


def current_state(session: Session, job_id: uuid.UUID) -> JobState | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


def request_cancel(session: Session, job_id: uuid.UUID) -> JobState | None:
    """Cancel a queued job at once, or ask a running one to stop. Returns the new state, None if final."""
    if transition(session, job_id, [JobState.queued], JobState.cancelled):
        return JobState.cancelled
    if transition(session, job_id, [JobState.running], JobState.cancelling):
        return JobState.cancelling
    state = current_state(session, job_id)
    return JobState.cancelling if state is JobState.cancelling else None


def start_attempt(session: Session, job_id: uuid.UUID, worker: str, max_attempts: int) -> bool:
    """Count a worker starting the job and mark it running; False if the worker must not run it.

    A job still `running` when a worker picks it up was being run by a worker
    that died (the broker redelivered it). Each start counts; once the count
    passes `max_attempts` the job is failed instead of started again, so a job
    that kills its worker (out of memory, a segfault) is not retried forever.
    """
    now = utcnow()
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_([JobState.queued, JobState.running]))
        .values(attempts=Job.attempts + 1, worker=worker, updated_at=now)
        .returning(Job.attempts, Job.state)
    ).first()
    if row is None:
        # Cancelled while queued, or its worker died while a cancel was in flight.
        transition(session, job_id, [JobState.cancelling], JobState.cancelled)
        return False
    attempts, state = row
    if attempts > max_attempts:
        transition(session, job_id, [JobState.queued, JobState.running], JobState.failed,
                   error=f"the worker running this job died {attempts - 1} times (limit: {max_attempts} attempts); "
                         "the job may need more memory or time than a worker has")
        return False
    if state is JobState.running:
        add_event(session, job_id, "attempt", {"attempt": attempts, "message": "restarted: the previous worker died"})
    transition(session, job_id, [JobState.queued, JobState.running], JobState.running,
               started_at=func.coalesce(Job.started_at, now))
    return True
