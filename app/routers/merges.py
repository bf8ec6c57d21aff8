"""/v1/merges: merge jobs; every job route but the POST comes from app.jobs, the same for each kind."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

import pivotmerge
from app import jobs
from app.deps import SessionDep, SettingsDep, TeamDep
from app.errors import ERROR_RESPONSES
from app.schemas import JobOut, SpecBody
from core.models import JobKind

MERGES = jobs.JobResource(JobKind.merge, "merges", "merge", pivotmerge.check)

router = APIRouter(prefix="/v1/merges", tags=["merges"], responses=ERROR_RESPONSES)


@router.post("", status_code=202, **jobs.route_docs(MERGES)["create"])
def create_merge(spec: SpecBody, request: Request, response: Response, session: SessionDep, team: TeamDep,
                 settings: SettingsDep, idempotency_key: jobs.IdempotencyKeyHeader = None,
                 label: jobs.LabelsQuery = None) -> JobOut:
    return jobs.create_job(MERGES, spec, label, idempotency_key, request, response, session, team, settings)


jobs.add_job_routes(router, MERGES)
