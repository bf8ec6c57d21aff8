"""A job's life against real Postgres, Redis and a Celery worker process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select
from transformers import LlavaForConditionalGeneration

from app.models import Artifact, Job, JobEvent
from service_support import merge_spec, wait_final, wait_for


def test_submit_merge_download_and_load(client: TestClient, team, tiny, worker, sessions, tmp_path) -> None:
    created = client.post("/v1/merges", json=merge_spec(tiny), headers=team)
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["Location"] == f"/v1/merges/{job['id']}"
    assert job["state"] == "queued" and job["kind"] == "merge"

    done = wait_final(client, created.headers["Location"], team)
    assert done["state"] == "succeeded", done
    assert done["progress"]["fraction"] == 1.0 and done["attempts"] == 1
    assert done["started_at"] <= done["finished_at"]

    listing = client.get(f"/v1/merges/{job['id']}/artifacts", headers=team).json()["artifacts"]
    names = {a["name"] for a in listing}
    assert {"config.json", "merge_report.json"} <= names and any(n.endswith(".safetensors") for n in names)
    out = tmp_path / "model"
    out.mkdir()
    for artifact in listing:
        response = client.get(artifact["url"], headers=team)
        assert response.status_code == 200
        assert response.headers["ETag"] == f'"{artifact["sha256"]}"'
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert len(response.content) == artifact["size"]
        (out / artifact["name"]).write_bytes(response.content)

    with sessions() as session:  # the records in Postgres are what the files hash to
        rows = session.scalars(select(Artifact).where(Artifact.job_id == uuid.UUID(job["id"]))).all()
        assert {r.name: r.sha256 for r in rows} == {a["name"]: a["sha256"] for a in listing}

    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "task_arithmetic"

    events = client.get(f"/v1/merges/{job['id']}/events", headers=team).json()["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    states = [e["data"]["state"] for e in events if e["type"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert any(e["type"] == "progress" for e in events)
