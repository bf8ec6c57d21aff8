"""/v1/analyses: weight-distance analyses, jobs of the same shape as merges."""

from core.models import JobKind
from app.routers.jobs import job_router

router = job_router(JobKind.analysis, "analyses", "analysis")
