"""Publishing a merge's output: shards keep the sha256 the writer computed, side files are hashed."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from sqlalchemy import select

from app.auth import create_team
from core.models import Artifact, Job
from core.settings import Settings
from core.storage import LocalStore
from workers.context import WorkerContext
from workers.kinds import Outcome
from workers.tasks import publish


def test_publish_reuses_the_writers_sha256_and_hashes_side_files(settings: Settings, sessions, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    shard = b"\x01" * 1000
    (out / "model.safetensors").write_bytes(shard)
    (out / "config.json").write_text('{"a": 1}')
    # The writer's digest stands in for the file's: publish must not read the shard again.
    writers_digest = "ab" * 32
    (out / "merge_report.json").write_text(json.dumps({"files": [
        {"name": "model.safetensors", "size": len(shard), "sha256": writers_digest}]}))
    report_bytes = (out / "merge_report.json").read_bytes()

    with sessions() as session:
        team = create_team(session, f"publish-{uuid.uuid4().hex[:8]}")
        job = Job(team_id=team.id, kind="merge", spec={}, request_sha256="0" * 64)
        session.add(job)
        session.flush()
        ctx = WorkerContext(settings, sessions, LocalStore(tmp_path / "store"), os.getpid())
        publish(ctx, session, job.id, out, Outcome(json.loads(report_bytes)))  # the report the run returned
        session.commit()
        rows = {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job.id))}

    assert rows["model.safetensors"].sha256 == writers_digest and rows["model.safetensors"].size == 1000
    assert rows["config.json"].sha256 == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert rows["merge_report.json"].sha256 == hashlib.sha256(report_bytes).hexdigest()
    stored = tmp_path / "store" / "jobs" / str(job.id) / "model.safetensors"
    assert stored.read_bytes() == shard


def test_publish_hashes_a_shard_whose_size_differs_from_the_report(settings: Settings, sessions, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"\x02" * 10)
    (out / "merge_report.json").write_text(json.dumps({"files": [
        {"name": "model.safetensors", "size": 11, "sha256": "cd" * 32}]}))
    with sessions() as session:
        team = create_team(session, f"publish-{uuid.uuid4().hex[:8]}")
        job = Job(team_id=team.id, kind="merge", spec={}, request_sha256="0" * 64)
        session.add(job)
        session.flush()
        publish(WorkerContext(settings, sessions, LocalStore(tmp_path / "store"), os.getpid()), session, job.id, out,
                Outcome(json.loads((out / "merge_report.json").read_text())))
        digest = session.scalar(select(Artifact.sha256).where(Artifact.job_id == job.id,
                                                              Artifact.name == "model.safetensors"))
        session.rollback()
    assert digest == hashlib.sha256(b"\x02" * 10).hexdigest()
