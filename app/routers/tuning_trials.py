"""/v1/tunings/{id}/trials: the trials of a tuning job (workers.kinds.tuning), beside the routes every kind has."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from sqlalchemy import select

from pivotmerge.report.study import best_of
from pivotmerge.tune.trials import DIRECTION
from workers.kinds.tuning import TUNING

from app.deps import SessionDep
from app.errors import ERROR_RESPONSES, NOT_FOUND
from app.job_routes import job_dependency
from app.schemas import TrialList, TrialOut
from core.models import Job, Trial

router = APIRouter(prefix=f"/v1/{TUNING.collection}", tags=[TUNING.collection], responses=ERROR_RESPONSES)
TuningDep = Annotated[Job, job_dependency(TUNING)]


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
