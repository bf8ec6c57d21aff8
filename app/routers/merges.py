"""/v1/merges: merge jobs."""

from ..models import JobKind
from .jobs import job_router

router = job_router(JobKind.merge, "merges", "merge")
