"""/v1/analyses: weight-distance analyses, jobs of the same shape as merges (their other routes from app.jobs)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from pivotmerge.analysis.analyze import check_analysis
from app import jobs
from app.deps import SessionDep, SettingsDep, TeamDep
from app.errors import ERROR_RESPONSES
from app.schemas import JobOut, SpecBody
from core.models import JobKind

# An analysis also needs two models to compare; check_analysis refuses fewer.
ANALYSES = jobs.JobResource(JobKind.analysis, "analyses", "analysis", check_analysis)

router = APIRouter(prefix="/v1/analyses", tags=["analyses"], responses=ERROR_RESPONSES)


@router.post("", status_code=202, **jobs.route_docs(ANALYSES)["create"])
def create_analysis(spec: SpecBody, request: Request, response: Response, session: SessionDep, team: TeamDep,
                    settings: SettingsDep, idempotency_key: jobs.IdempotencyKeyHeader = None,
                    label: jobs.LabelsQuery = None) -> JobOut:
    return jobs.create_job(ANALYSES, spec, label, idempotency_key, request, response, session, team, settings)


jobs.add_job_routes(router, ANALYSES)
