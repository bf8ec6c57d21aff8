"""Tuning jobs (/v1/tunings): the engine's study (`pivotmerge tune`) run by the job's task, its trials
fanned out; the chosen trial's merge is the output. The request is core.tuning_request.TuningRequest;
the trials' rows are read at /v1/tunings/{id}/trials (app.routers.tuning_trials).

With `Settings.trial_queue` set, each batch of the study's proposals goes out as trial tasks
(workers.tuning_trials) to the workers reading that queue, and the study waits for their rows in `trials`;
empty, the job's own process runs the trials. Either way every trial the study tells is a row, the
job's progress is trials done out of the budget (with a `trial` event each), and the cancel check stops
the study between batches and while it waits. The job's lease is renewed meanwhile by the task's own
thread (workers.tasks.lease_keeper), as for any job.

A restarted attempt runs the study again from its seed: it proposes the same trials, and when they are
fanned out, those an earlier attempt recorded are read back instead of being sent again.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from celery import current_app
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import pivotmerge
from core.job_states import add_event, holds_lease
from core.models import Job, Trial, utcnow
from core.settings import Settings
from core.tuning_request import TuningRequest
from pivotmerge.data.evaluate import DatasetMetrics
from pivotmerge.errors import MergeCancelled, SpecError
from pivotmerge.progress import Progress
from pivotmerge.report.study import TrialRecord
from pivotmerge.spec.schema import MergeSpec
from pivotmerge.tune.space import FieldNames, read_space
from pivotmerge.tune.study import Proposal
from pivotmerge.tune.tuning import check_tuning, tune

from workers.celery_app import enqueue_trial
from workers.context import JobHooks
from workers.kinds import JobKind, JobRun, Outcome, declare

POLL_SECONDS = 0.2  # how often a study waiting for its trials looks for their rows
RECORD_FIELDS = tuple(TrialRecord.model_fields)
# Metrics that are numbers even when not finite; JSON columns hold null for those (core.db).
FLOAT_METRICS = {name for name, f in DatasetMetrics.model_fields.items() if f.annotation is float}


def record_of(row: Trial) -> TrialRecord:
    dev = [{k: math.nan if v is None and k in FLOAT_METRICS else v for k, v in metrics.items()} for metrics in row.dev]
    return TrialRecord.model_validate({**{name: getattr(row, name) for name in RECORD_FIELDS}, "dev": dev})


def save_trial(session: Session, job_id: uuid.UUID, record: TrialRecord, worker: str | None) -> None:
    """Add the trial's row, unless it is recorded already (by the worker that ran it, or an earlier attempt)."""
    if session.get(Trial, (job_id, record.number)) is None:
        session.add(Trial(job_id=job_id, worker=worker, **record.model_dump(mode="json")))


class Study:
    """One attempt's study, as the job sees it: each trial told is a row, an event and the job's progress."""

    def __init__(self, hooks: JobHooks, settings: Settings, budget: int, worker: str | None) -> None:
        self.hooks = hooks
        self.settings = settings
        self.budget = budget
        self.worker = worker  # the job's worker: it runs the trials itself when they are not fanned out
        self.done = 0
        self.stage: str | None = None

    def start(self, budget: int) -> None:
        self.budget = budget

    def told(self, record: TrialRecord) -> None:
        self.done += 1
        h = self.hooks
        with h.sessions() as session:
            ours = session.execute(update(Job).where(Job.id == h.job_id, holds_lease(h.attempt)).values(
                progress_fraction=min(self.done / self.budget, 1.0), progress_stage="tune", progress_layer=None,
                progress_message=f"{self.done} of {self.budget} trials; trial {record.number}: {record.label} {record.state}",
                updated_at=utcnow())).rowcount
            if ours:
                save_trial(session, h.job_id, record, None if record.state == "repeat" else self.worker)
                add_event(session, h.job_id, "trial", {
                    "number": record.number, "label": record.label, "method": record.method, "state": record.state,
                    "objective": record.objective, "error": record.error, "done": self.done, "total": self.budget,
                    "fraction": min(self.done / self.budget, 1.0)})
            session.commit()

    def final_merge(self, p: Progress) -> None:
        """The chosen trial's merge, one progress report per stage: the job's fraction stays the trials'."""
        if p.stage != self.stage:
            self.stage = p.stage
            self.hooks.progress(Progress(stage=p.stage, done=self.done, total=self.budget,
                                         message="writing the chosen trial's merge"))

    def _recorded(self, numbers: Sequence[int]) -> dict[int, TrialRecord]:
        with self.hooks.sessions() as session:
            rows = session.scalars(select(Trial).where(Trial.job_id == self.hooks.job_id, Trial.number.in_(numbers)))
            return {row.number: record_of(row) for row in rows}

    def fan_out(self, proposals: Sequence[Proposal]) -> list[TrialRecord]:
        """The study's BatchFn: each proposal as a trial task; their records once every one has its row."""
        numbers = [p.number for p in proposals]
        recorded = self._recorded(numbers)
        for p in proposals:
            if p.number not in recorded:
                enqueue_trial(current_app, self.hooks.job_id, self.hooks.attempt, asdict(p), self.settings.trial_queue)
        while len(recorded) < len(numbers):
            if self.hooks.should_cancel():
                raise MergeCancelled("tuning cancelled")
            time.sleep(POLL_SECONDS)
            recorded = self._recorded(numbers)
        return [recorded[n] for n in numbers]


def run_tuning(run: JobRun) -> Outcome:
    """Run the study and write the chosen trial's merge into the output folder; the metrics are the chosen
    trial's dev scores and its test scores."""
    request: TuningRequest = run.request
    hooks, settings, out_dir = run.job, run.settings, run.out_dir
    with hooks.sessions() as session:
        worker = session.scalar(select(Job.worker).where(Job.id == hooks.job_id))
    study = Study(hooks, settings, request.trials, worker)
    report = tune(request.spec, {"space": request.space}, request.dev, out_dir, methods=request.methods,
                  trials=request.trials, objective=request.objective, test=request.test, seed=request.seed,
                  timeout_s=request.timeout_s, run_batch=study.fan_out if settings.trial_queue else None,
                  batch_size=request.batch_size, on_start=study.start, on_trial=study.told, progress=study.final_merge,
                  should_cancel=hooks.should_cancel, allowed_roots=settings.allowed_roots)
    assert report.study is not None  # tune always records it
    chosen = report.study.best_trial()
    metrics = {"dev": [m.model_dump(mode="json") for m in chosen.dev],
               "test": [m.model_dump(mode="json") for m in report.study.best_test or []]}
    return Outcome(report.as_json(), metrics)


# The request's fields, as errors about the space and the candidates name them.
FIELDS = FieldNames(space="space", methods="methods")
MAX_SEED = 2**32 - 1  # Optuna's samplers take a 32-bit seed


def check_tuning_spec(spec: MergeSpec, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None:
    # Trials open the repos without downloading (the engine's tuning reads hub ids from the cache only).
    pivotmerge.check(spec, allowed_roots=allowed_roots, allow_downloads=False)


def check_tuning_request(request: TuningRequest, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None:
    """What the worker would refuse, refused now: the space, every dev and test set (records and images,
    under the allowed roots) and the objective they must score."""
    check_tuning(request.spec, {"space": request.space}, request.dev, methods=request.methods,
                 objective=request.objective, test=request.test, allowed_roots=allowed_roots, names=FIELDS)


def accept_tuning(request: TuningRequest, settings: Settings) -> TuningRequest:
    """The request with its defaults filled in (the candidates and the seed), as the job keeps it."""
    seed, field = (request.spec.seed, "spec.seed") if request.seed is None else (request.seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise SpecError(f"{field}: the study's sampler takes a seed in 0..{MAX_SEED}, got {seed}")
    if request.timeout_s is not None and request.timeout_s >= settings.task_soft_time_limit:
        raise SpecError(f"timeout_s: must be under the job's time limit of {settings.task_soft_time_limit} s "
                        "(the best trial's merge comes after it)")
    space = read_space(request.spec, {"space": request.space}, request.methods, FIELDS)
    return request.model_copy(update={"methods": [c.label for c in space.candidates], "seed": seed})


TUNING = declare(JobKind(name="tuning", collection="tunings", noun="tuning", label="Tuning", request=TuningRequest,
                         run=run_tuning, check_spec=check_tuning_spec, check_request=check_tuning_request,
                         spec_field="spec", accept=accept_tuning))
