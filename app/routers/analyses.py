"""/v1/analyses: weight-distance analyses, jobs of the same shape as merges."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from pivotmerge.analysis.analyze import check_analysis
from app import jobs
from app.deps import SessionDep, SettingsDep, StoreDep, TeamDep
from app.errors import ERROR_RESPONSES
from app.schemas import ArtifactList, JobOut, JobPage, MetricsOut, SpecBody
from core.models import Job, JobKind

# An analysis also needs two models to compare; check_analysis refuses fewer.
ANALYSES = jobs.JobResource(JobKind.analysis, "analyses", "analysis", check_analysis)
DOCS = jobs.route_docs(ANALYSES)

router = APIRouter(prefix="/v1/analyses", tags=["analyses"], responses=ERROR_RESPONSES)


def analysis_job(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> Job:
    return jobs.load_job(session, team, ANALYSES, job_id)


AnalysisDep = Annotated[Job, Depends(analysis_job)]


@router.post("", status_code=202, **DOCS["create"])
def create_analysis(spec: SpecBody, request: Request, response: Response, session: SessionDep, team: TeamDep,
                    settings: SettingsDep, idempotency_key: jobs.IdempotencyKeyHeader = None,
                    label: jobs.LabelsQuery = None) -> JobOut:
    return jobs.create_job(ANALYSES, spec, label, idempotency_key, request, response, session, team, settings)


@router.get("", **DOCS["list"])
def list_analyses(session: SessionDep, team: TeamDep, page_size: jobs.PageSizeQuery = 20,
                  page_token: jobs.PageTokenQuery = None, state: jobs.StatesQuery = None,
                  label: jobs.LabelsQuery = None) -> JobPage:
    return jobs.list_jobs(ANALYSES, session, team, page_size, page_token, state, label)


@router.get("/{job_id}", **DOCS["get"])
def get_analysis(job: AnalysisDep) -> JobOut:
    return jobs.job_out(job)


@router.delete("/{job_id}", **DOCS["delete"])
def delete_analysis(job: AnalysisDep, session: SessionDep, store: StoreDep) -> JobOut:
    return jobs.delete_job(ANALYSES, session, store, job)


@router.post("/{job_id}:cancel", **DOCS["cancel"])
def cancel_analysis(job: AnalysisDep, session: SessionDep) -> JobOut:
    return jobs.cancel_job(ANALYSES, session, job)


@router.get("/{job_id}/events", **DOCS["events"])
def list_analysis_events(job: AnalysisDep, request: Request, session: SessionDep,
                         after_seq: jobs.AfterSeqQuery = 0, last_event_id: jobs.LastEventIdHeader = None) -> Any:
    return jobs.job_events(job, request, session, after_seq, last_event_id)


@router.get("/{job_id}/metrics", **DOCS["metrics"])
def get_analysis_metrics(job: AnalysisDep) -> MetricsOut:
    return jobs.job_metrics(job)


@router.get("/{job_id}/artifacts", **DOCS["artifacts"])
def list_analysis_artifacts(job: AnalysisDep) -> ArtifactList:
    return jobs.job_artifacts(ANALYSES, job)


@router.get("/{job_id}/artifacts:archive", **DOCS["archive"])
def download_analysis_archive(job: AnalysisDep, store: StoreDep) -> Response:
    return jobs.download_archive(ANALYSES, job, store)


@router.get("/{job_id}/artifacts/{name}", **DOCS["download"])
def download_analysis_artifact(job: AnalysisDep, name: jobs.ArtifactNamePath, session: SessionDep, store: StoreDep,
                               range_header: jobs.RangeHeader = None, if_none_match: jobs.IfNoneMatchHeader = None,
                               ) -> Response:
    return jobs.download_artifact(ANALYSES, job, name, session, store, range_header, if_none_match)
