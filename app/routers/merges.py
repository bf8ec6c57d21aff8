"""/v1/merges: merge jobs."""

from core.models import JobKind
from app.routers.jobs import job_router

router = job_router(JobKind.merge, "merges", "merge")
