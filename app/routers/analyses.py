"""/v1/analyses: weight-distance analyses, jobs of the same shape as merges."""

from ..models import JobKind
from .jobs import job_router

router = job_router(JobKind.analysis, "analyses", "analysis")
