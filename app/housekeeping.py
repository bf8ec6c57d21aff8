"""Periodic work of the API process, each a heartbeat thread (service_core.heartbeat).

- The job dispatcher: every `dispatch_seconds`, and at once after a submission (the
  app's `wake_dispatcher`), waiting jobs go to free workers by fair share, and jobs
  whose message was never sent are sent (service_core.team_queues). Workers run
  passes too (when a job ends, and with their heartbeat).

- The lease reaper: a running job's worker renews its lease
  (workers.tasks.lease_keeper). When the worker's main process dies, nothing
  renews it; every `lease_check_seconds` such jobs go back to the queue, or fail
  past `max_attempts` (service_core.job_states.reap_lapsed_leases), so a dead worker's
  job runs again within about lease + check seconds (20 s by default); a job
  it ends loses the files its dead attempt had stored.
- Webhooks: every `webhook_dispatch_seconds` the deliveries recorded with
  final job states are handed to the delivery task (workers.webhooks).
- Retention: with `artifact_retention_days` set, every `retention_check_seconds`
  the artifacts of jobs finished longer ago are deleted (service_core.retention).

Several API processes may each run one: every change is a conditional UPDATE.
"""

from __future__ import annotations

import uuid

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service_core.heartbeat import Heartbeat
from service_core.job_states import reap_lapsed_leases
from service_core.models import WebhookDelivery, utcnow
from service_core.retention import expire_artifacts
from service_core.settings import Settings
from service_core.storage import ArtifactStore, artifact_key
from service_core.team_queues import dispatch_once, send_dispatched
from workers.celery_app import enqueue_delivery, enqueue_job


DISPATCHER = "job-dispatcher"


def reap_once(sessions: sessionmaker[Session], celery: Celery, store: ArtifactStore,
              max_attempts: int) -> list[uuid.UUID]:
    """One pass of the lease reaper: the jobs requeued.

    A job it ends (cancelled or failed) loses the files its dead attempt had
    already put in the store (it may have died publishing them).
    """
    with sessions() as session:
        requeued, ended = reap_lapsed_leases(session, max_attempts)
        session.commit()
    for job_id in ended:
        store.delete_prefix(artifact_key(job_id, ""))
    # Sent as the dispatcher sends: one the broker refuses now is sent again by a later dispatch pass.
    send_dispatched(sessions, lambda job_id: enqueue_job(celery, job_id), requeued)
    return requeued


def dispatch_deliveries(sessions: sessionmaker[Session], celery: Celery) -> int:
    """Hand webhook deliveries recorded since the last pass to the delivery task; the number sent."""
    with sessions() as session:
        claimed = session.scalars(
            update(WebhookDelivery).where(WebhookDelivery.dispatched_at.is_(None))
            .values(dispatched_at=utcnow()).returning(WebhookDelivery.id)).all()
        session.commit()
    for delivery_id in claimed:
        try:
            enqueue_delivery(celery, delivery_id)
        except Exception:  # the broker is away: the next pass sends it
            with sessions() as session:
                session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                                .values(dispatched_at=None))
                session.commit()
            raise
    return len(claimed)


def expire_once(sessions: sessionmaker[Session], store: ArtifactStore, retention_days: int) -> list[uuid.UUID]:
    with sessions() as session:
        return expire_artifacts(session, store, retention_days)


def housekeeping(settings: Settings, sessions: sessionmaker[Session], celery: Celery,
                 store: ArtifactStore) -> list[Heartbeat]:
    """The API process's periodic work, a heartbeat each (none when `housekeeping` is off); a failed pass is
    logged and the next one tries again."""
    if not settings.housekeeping:
        return []
    beats = [Heartbeat(DISPATCHER, settings.dispatch_seconds,
                       lambda: dispatch_once(sessions, lambda job_id: enqueue_job(celery, job_id), settings),
                       first_now=True),
             Heartbeat("lease-reaper", settings.lease_check_seconds,
                       lambda: reap_once(sessions, celery, store, settings.max_attempts)),
             Heartbeat("webhook-dispatch", settings.webhook_dispatch_seconds,
                       lambda: dispatch_deliveries(sessions, celery))]
    if settings.artifact_retention_days:
        beats.append(Heartbeat("retention", settings.retention_check_seconds,
                               lambda: expire_once(sessions, store, settings.artifact_retention_days)))
    return beats
