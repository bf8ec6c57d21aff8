"""Removing a finished job's artifacts: on DELETE, or once they are older than the retention setting.

The job row stays (with `deleted_at` and an event saying why), so a team's
history and metrics survive; only the stored files and their records go.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from service_core.job_states import add_event
from service_core.models import FINAL_STATES, Artifact, Job, utcnow
from service_core.storage import ArtifactStore, artifact_key


def remove_artifacts(session: Session, store: ArtifactStore, job_id: uuid.UUID, event: str,
                     data: dict[str, Any]) -> bool:
    """Delete a finished job's artifacts, records first, files once that is committed.

    False if the job is not finished or was deleted already. The order means a
    failure in between leaves unreferenced files, never a record of a missing file.
    """
    marked = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(FINAL_STATES), Job.deleted_at.is_(None))
        .values(deleted_at=utcnow()).execution_options(synchronize_session=False)).rowcount
    if not marked:
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    add_event(session, job_id, event, data)
    session.commit()
    store.delete_prefix(artifact_key(job_id, ""))
    return True


def expire_artifacts(session: Session, store: ArtifactStore, retention_days: int) -> list[uuid.UUID]:
    """Remove the artifacts of jobs that finished more than `retention_days` ago; the ids expired."""
    cutoff = utcnow() - timedelta(days=retention_days)
    old = session.scalars(select(Job.id).where(Job.state.in_(FINAL_STATES), Job.deleted_at.is_(None),
                                               Job.finished_at < cutoff)).all()
    reason = {"reason": f"artifacts older than the retention of {retention_days} days"}
    return [job_id for job_id in old if remove_artifacts(session, store, job_id, "expired", reason)]
