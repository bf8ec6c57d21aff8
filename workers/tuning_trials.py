"""Trial tasks: the trials a tuning job fans out (workers.kinds.tuning), run by the workers reading its queue.

    celery -A workers.worker worker -Q trials -c 1        # e.g. one per spare GPU

Each worker process keeps the `TrialRunner` of the study it ran last (inputs read, evaluation model
loaded, dev sets tokenised, once), so the study's later trials there only merge and evaluate. It lets
go of it as soon as it runs a task of any other kind, so a merge job gets the memory back.

A trial is run only while its job is running and still the sending attempt's, and recorded only if it
still is when the trial ends: once a tuning is cancelled, the trials still queued do nothing and those
in flight write nothing.
"""

from __future__ import annotations

import gc
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from celery.signals import task_prerun
from sqlalchemy import select

from core.models import Job, JobState, Trial
from core.settings import Settings
from core.tuning_request import TuningRequest
from pivotmerge.tune.study import Proposal, failed_trial, run_trial
from pivotmerge.tune.trials import TrialRunner
from pivotmerge.tune.tuning import load_datasets

from workers.celery_app import RUN_TRIAL
from workers.context import context, worker_name
from workers.kinds.tuning import save_trial


@dataclass
class CachedRunner:
    job_id: uuid.UUID
    runner: TrialRunner


_cached: CachedRunner | None = None


def runner_for(job_id: uuid.UUID, request: TuningRequest, settings: Settings) -> TrialRunner:
    """The study's TrialRunner in this process: the one kept from its last trial here, else a new one."""
    global _cached
    if _cached is None or _cached.job_id != job_id:
        release_runner()
        dev = load_datasets(request.dev, "dev", allowed_roots=settings.allowed_roots)
        _cached = CachedRunner(job_id, TrialRunner(request.spec, dev, request.objective,
                                                   allowed_roots=settings.allowed_roots))
    return _cached.runner


def release_runner() -> None:
    global _cached
    if _cached is not None:
        _cached.runner.close()
        _cached = None
        gc.collect()  # the loaded model holds reference cycles: free it now, not at some later collection


@task_prerun.connect
def release_before_other_tasks(sender: Task | None = None, **_: Any) -> None:
    if sender is not None and sender.name != RUN_TRIAL:
        release_runner()


def still_running(job: Any, attempt: int) -> bool:
    return job is not None and job.state is JobState.running and job.attempts == attempt


@shared_task(name=RUN_TRIAL, bind=True)
def run_trial_task(self: Task, job_id: str, attempt: int, proposal: dict[str, Any]) -> None:
    ctx = context()
    jid = uuid.UUID(job_id)
    trial = Proposal(**proposal)
    with ctx.sessions() as session:
        job = session.get(Job, jid)
        recorded = session.get(Trial, (jid, trial.number)) is not None
    if recorded or not still_running(job, attempt):  # a duplicate delivery, or the study stopped
        return
    assert job is not None
    started = time.perf_counter()
    try:
        record = run_trial(runner_for(jid, TuningRequest.model_validate(job.spec), ctx.settings), trial)
    except Exception as exc:  # no runner here (a dataset gone since submit, out of memory): this trial failed
        release_runner()
        record = failed_trial(trial, exc, time.perf_counter() - started)
    with ctx.sessions() as session:
        # Locks the job's row: a cancel either comes before this write (no row) or after it.
        job = session.execute(select(Job.state, Job.attempts).where(Job.id == jid).with_for_update()).first()
        if still_running(job, attempt):
            save_trial(session, jid, record, worker_name(self.request.hostname))
        session.commit()
