"""/v1/merges: merge jobs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

import pivotmerge
from app import jobs
from app.deps import SessionDep, SettingsDep, StoreDep, TeamDep
from app.errors import ERROR_RESPONSES
from app.schemas import ArtifactList, JobOut, JobPage, MetricsOut, SpecBody
from core.models import Job, JobKind

MERGES = jobs.JobResource(JobKind.merge, "merges", "merge", pivotmerge.check)
DOCS = jobs.route_docs(MERGES)

router = APIRouter(prefix="/v1/merges", tags=["merges"], responses=ERROR_RESPONSES)


def merge_job(job_id: uuid.UUID, session: SessionDep, team: TeamDep) -> Job:
    return jobs.load_job(session, team, MERGES, job_id)


MergeDep = Annotated[Job, Depends(merge_job)]


@router.post("", status_code=202, **DOCS["create"])
def create_merge(spec: SpecBody, request: Request, response: Response, session: SessionDep, team: TeamDep,
                 settings: SettingsDep, idempotency_key: jobs.IdempotencyKeyHeader = None,
                 label: jobs.LabelsQuery = None) -> JobOut:
    return jobs.create_job(MERGES, spec, label, idempotency_key, request, response, session, team, settings)


@router.get("", **DOCS["list"])
def list_merges(session: SessionDep, team: TeamDep, page_size: jobs.PageSizeQuery = 20,
                page_token: jobs.PageTokenQuery = None, state: jobs.StatesQuery = None,
                label: jobs.LabelsQuery = None) -> JobPage:
    return jobs.list_jobs(MERGES, session, team, page_size, page_token, state, label)


@router.get("/{job_id}", **DOCS["get"])
def get_merge(job: MergeDep) -> JobOut:
    return jobs.job_out(job)


@router.delete("/{job_id}", **DOCS["delete"])
def delete_merge(job: MergeDep, session: SessionDep, store: StoreDep) -> JobOut:
    return jobs.delete_job(MERGES, session, store, job)


@router.post("/{job_id}:cancel", **DOCS["cancel"])
def cancel_merge(job: MergeDep, session: SessionDep) -> JobOut:
    return jobs.cancel_job(MERGES, session, job)


@router.get("/{job_id}/events", **DOCS["events"])
def list_merge_events(job: MergeDep, request: Request, session: SessionDep, after_seq: jobs.AfterSeqQuery = 0,
                      last_event_id: jobs.LastEventIdHeader = None) -> Any:
    return jobs.job_events(job, request, session, after_seq, last_event_id)


@router.get("/{job_id}/metrics", **DOCS["metrics"])
def get_merge_metrics(job: MergeDep) -> MetricsOut:
    return jobs.job_metrics(job)


@router.get("/{job_id}/artifacts", **DOCS["artifacts"])
def list_merge_artifacts(job: MergeDep) -> ArtifactList:
    return jobs.job_artifacts(MERGES, job)


@router.get("/{job_id}/artifacts:archive", **DOCS["archive"])
def download_merge_archive(job: MergeDep, store: StoreDep) -> Response:
    return jobs.download_archive(MERGES, job, store)


@router.get("/{job_id}/artifacts/{name}", **DOCS["download"])
def download_merge_artifact(job: MergeDep, name: jobs.ArtifactNamePath, session: SessionDep, store: StoreDep,
                            range_header: jobs.RangeHeader = None, if_none_match: jobs.IfNoneMatchHeader = None,
                            ) -> Response:
    return jobs.download_artifact(MERGES, job, name, session, store, range_header, if_none_match)
