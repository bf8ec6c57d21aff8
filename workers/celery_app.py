"""Celery configuration shared by the API (which enqueues) and the workers (see workers/worker.py).

One job at a time per worker (one worker per GPU): concurrency 1, prefetch 1.
Jobs run in the prefork pool's child process, forked from a parent that never
initialises CUDA, so no process forks after CUDA is up; the child keeps its CUDA
context from job to job (recycling it per job cost seconds of start-up each
time). Late acknowledgement plus reject-on-worker-lost puts a job whose process
died back on the queue, and the pool forks a new child for it; the attempts
counter on the job row (see core.job_states.start_attempt) stops such a job from
coming back forever.
"""

from __future__ import annotations

import uuid

from celery import Celery

from core.settings import GPU_QUEUE, Settings

RUN_JOB = "pivotmerge.run_job"
RUN_TRIAL = "pivotmerge.run_trial"  # one trial of a tuning job (workers.tuning_trials), sent to Settings.trial_queue
RUN_SPLIT_PART = "pivotmerge.run_split_part"  # one part of a split merge job (workers.split_parts)
SPLIT_QUEUE = "split"
DELIVER_WEBHOOK = "pivotmerge.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"


def make_celery(settings: Settings) -> Celery:
    celery = Celery("pivotmerge", broker=settings.broker_url, include=["workers.tasks", "workers.tuning_trials", "workers.split_parts", "workers.webhooks"])
    transport_options: dict[str, object] = {}
    # The embedded SQLite broker (kombu's SQLAlchemy transport) hands its options
    # to create_engine and has no visibility timeout: it takes none of these.
    if not settings.broker_url.startswith("sqla+"):
        transport_options["visibility_timeout"] = settings.broker_visibility_timeout
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    celery.conf.update(
        task_routes={RUN_JOB: {"queue": GPU_QUEUE}, DELIVER_WEBHOOK: {"queue": WEBHOOK_QUEUE}},
        task_default_queue=GPU_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Job state lives in the database; Celery keeps no results.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )
    return celery


def service_queues(settings: Settings) -> list[str]:
    """Every queue of this app the service sends to: one worker reading them all runs everything it sends."""
    return [GPU_QUEUE, WEBHOOK_QUEUE] + ([settings.trial_queue] if settings.trial_queue else [])


def enqueue_job(celery: Celery, job_id: uuid.UUID) -> None:
    celery.send_task(RUN_JOB, args=[str(job_id)], queue=GPU_QUEUE)


def enqueue_delivery(celery: Celery, delivery_id: uuid.UUID) -> None:
    celery.send_task(DELIVER_WEBHOOK, args=[str(delivery_id)], queue=WEBHOOK_QUEUE)


def enqueue_trial(celery: Celery, job_id: uuid.UUID, attempt: int, proposal: dict[str, object], queue: str) -> None:
    celery.send_task(RUN_TRIAL, args=[str(job_id), attempt, proposal], queue=queue)


def enqueue_split_part(celery: Celery, job_id: uuid.UUID, attempt: int, part: int, scratch: str) -> str:
    """Send one part of a split merge job to the split queue; the task's id."""
    return celery.send_task(RUN_SPLIT_PART, args=[str(job_id), attempt, part, scratch], queue=SPLIT_QUEUE).id
