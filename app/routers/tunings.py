"""/v1/tunings: tuning studies (`pivotmerge tune` as a job), with the job routes every kind has and the trials."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

import pivotmerge
from pivotmerge.report.study import best_of
from pivotmerge.tune.space import FieldNames, read_space
from pivotmerge.tune.trials import DIRECTION
from pivotmerge.tune.tuning import check_tuning
from app import jobs
from app.deps import SessionDep, SettingsDep, TeamDep
from app.errors import ERROR_RESPONSES, NOT_FOUND, ApiError
from app.schemas import JobOut, TrialList, TrialOut
from core.models import JobKind, Trial
from core.settings import Settings
from core.tunings import TuningRequest

# The request's fields, as errors about the space and the candidates name them.
FIELDS = FieldNames(space="space", methods="methods")
MAX_SEED = 2**32 - 1  # Optuna's samplers take a 32-bit seed


def check_tuning_request(request: TuningRequest, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None:
    """What the worker would refuse, refused now: the spec (repos, shapes), the space, every dev and test set
    (records and images, under the allowed roots) and the objective they must score."""
    with jobs.fields_under(TUNINGS.spec_field):
        # Trials open the repos without downloading (the engine's tuning reads hub ids from the cache only).
        pivotmerge.check(request.spec, allowed_roots=allowed_roots, allow_downloads=False)
    check_tuning(request.spec, {"space": request.space}, request.dev, methods=request.methods,
                 objective=request.objective, test=request.test, allowed_roots=allowed_roots, names=FIELDS)


TUNINGS = jobs.JobResource(JobKind.tuning, "tunings", "tuning", check_tuning_request, spec_field="spec")

router = APIRouter(prefix="/v1/tunings", tags=["tunings"], responses=ERROR_RESPONSES)


def accepted(request: TuningRequest, settings: Settings) -> TuningRequest:
    """The request with its defaults filled in (the candidates and the seed), as the job keeps it."""
    seed, field = (request.spec.seed, "spec.seed") if request.seed is None else (request.seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(422, f"{field}: the study's sampler takes a seed in 0..{MAX_SEED}, got {seed}", field)
    if request.timeout_s is not None and request.timeout_s >= settings.task_soft_time_limit:
        raise ApiError(422, f"timeout_s: must be under the job's time limit of {settings.task_soft_time_limit} s "
                            "(the best trial's merge comes after it)", "timeout_s")
    space = read_space(request.spec, {"space": request.space}, request.methods, FIELDS)
    return request.model_copy(update={"methods": [c.label for c in space.candidates], "seed": seed})


@router.post("", status_code=202, **jobs.route_docs(TUNINGS)["create"])
def create_tuning(body: TuningRequest, request: Request, response: Response, session: SessionDep, team: TeamDep,
                  settings: SettingsDep, idempotency_key: jobs.IdempotencyKeyHeader = None,
                  label: jobs.LabelsQuery = None) -> JobOut:
    return jobs.create_job(TUNINGS, accepted(body, settings), label, idempotency_key, request, response, session, team,
                           settings)


TuningDep = jobs.add_job_routes(router, TUNINGS)


@router.get("/{job_id}/trials", operation_id="list_tuning_trials", responses=NOT_FOUND, summary="Trials of a tuning",
            description="Every trial recorded so far, in order: its candidate, parameters, dev metrics and objective, "
                        "state, seconds and worker; with the best so far.")
def list_tuning_trials(job: TuningDep, session: SessionDep) -> TrialList:
    rows = session.scalars(select(Trial).where(Trial.job_id == job.id).order_by(Trial.number)).all()
    objective = job.spec["objective"]
    best = best_of(rows, DIRECTION[objective])
    return TrialList(objective=objective, direction=DIRECTION[objective], budget=job.spec["trials"],
                     best=None if best is None else best.number,
                     trials=[TrialOut.model_validate(row, from_attributes=True) for row in rows])
