"""The lease reaper: a thread of the API process that requeues or fails jobs whose worker died.

A running job's worker renews its lease (workers.tasks.LeaseKeeper). When the
worker's main process dies, nothing renews it; every `lease_check_seconds` the
reaper moves such jobs back to the queue, or fails them past `max_attempts`
(core.job_states.reap_lapsed_leases), so a dead worker's job runs again within
about lease + check seconds (40 s by default). Several API processes may each
run one: every move is a conditional UPDATE.
"""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.job_states import reap_lapsed_leases, transition
from core.models import JobState
from workers.celery_app import enqueue_job

log = logging.getLogger(__name__)


def reap_once(sessions: sessionmaker[Session], celery: Celery, max_attempts: int) -> list[uuid.UUID]:
    """One pass: the jobs requeued."""
    with sessions() as session:
        requeued = reap_lapsed_leases(session, max_attempts)
        session.commit()
    for job_id in requeued:
        try:
            enqueue_job(celery, job_id)
        except Exception as exc:  # kombu raises many types for an unreachable broker
            with sessions() as session:
                transition(session, job_id, [JobState.queued], JobState.failed,
                           error=f"could not requeue the job after its worker died: {exc}")
                session.commit()
    return requeued


class LeaseReaper:
    def __init__(self, sessions: sessionmaker[Session], celery: Celery, max_attempts: int, every_seconds: float) -> None:
        self.sessions, self.celery, self.max_attempts, self.every_seconds = sessions, celery, max_attempts, every_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_seconds):
            try:
                for job_id in reap_once(self.sessions, self.celery, self.max_attempts):
                    log.warning("job %s: its worker stopped renewing the lease; requeued", job_id)
            except Exception:  # the database is away: the next pass tries again
                log.warning("lease reaper pass failed", exc_info=True)
