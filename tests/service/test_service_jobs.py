"""A job's life against real Postgres, Redis and a Celery worker process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from transformers import LlavaForConditionalGeneration

from app.main import create_app
from service_core.models import Artifact
from service_core.settings import Settings
from tests.service.service_support import WorkerProcess, freeze_mid_job, merge_spec, service_env, submit_and_freeze, wait_final


def test_submit_merge_download_and_load(client: TestClient, team, tiny, worker, sessions, tmp_path) -> None:
    created = client.post("/v1/merges", json=merge_spec(tiny), headers=team)
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["Location"] == f"/v1/merges/{job['id']}"
    assert job["state"] == "waiting" and job["kind"] == "merge" and job["priority"] == 0

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
    assert states == ["waiting", "queued", "running", "succeeded"]
    assert any(e["type"] == "progress" for e in events)


def test_cancel_running_job_stops_it_and_leaves_no_output(client, team, tiny, worker, sessions, settings) -> None:
    job_id, pid = submit_and_freeze(client, team, sessions, merge_spec(tiny))
    try:
        cancelling = client.post(f"/v1/merges/{job_id}:cancel", headers=team)
        assert cancelling.status_code == 200 and cancelling.json()["state"] == "cancelling"
    finally:
        os.kill(pid, signal.SIGCONT)
    done = wait_final(client, f"/v1/merges/{job_id}", team)
    assert done["state"] == "cancelled"
    assert client.get(f"/v1/merges/{job_id}/artifacts", headers=team).json() == {"artifacts": []}
    assert not [p for p in settings.work_dir.iterdir() if p.name.startswith(job_id)]
    assert not (settings.storage_dir / "jobs" / job_id).exists()
    events = client.get(f"/v1/merges/{job_id}/events", headers=team).json()["events"]
    assert [e["data"]["state"] for e in events if e["type"] == "state"] == ["waiting", "queued", "running", "cancelling", "cancelled"]

    again = client.post(f"/v1/merges/{job_id}:cancel", headers=team)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_worker_killed_mid_job_is_retried_then_failed(client, team, tiny, worker, sessions, settings) -> None:
    max_attempts = settings.max_attempts
    for _ in range(10):
        job_id = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()["id"]
        for attempt in range(1, max_attempts + 1):
            pid = freeze_mid_job(sessions, job_id, attempt)
            if pid is None:
                break
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        else:
            break
        wait_final(client, f"/v1/merges/{job_id}", team)  # an attempt finished before it could be killed: again
    else:
        raise AssertionError("no job could be killed mid-way on every attempt")

    done = wait_final(client, f"/v1/merges/{job_id}", team)
    assert done["state"] == "failed"
    assert f"died {max_attempts} times" in done["error"]
    events = client.get(f"/v1/merges/{job_id}/events", headers=team).json()["events"]
    assert [e["data"]["attempt"] for e in events if e["type"] == "attempt"] == list(range(2, max_attempts + 1))
    assert [e["data"]["state"] for e in events if e["type"] == "state"][-1] == "failed"
    assert client.get(f"/v1/merges/{job_id}/artifacts", headers=team).json() == {"artifacts": []}

    # The worker survives its children's deaths and takes the next job.
    nxt = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
    assert wait_final(client, f"/v1/merges/{nxt['id']}", team)["state"] == "succeeded"


def test_cancel_queued_job_is_immediate_and_the_worker_skips_it(client, team, tiny, worker, sessions) -> None:
    # The worker runs one job at a time: while the first is held, the second waits in the queue.
    first, pid = submit_and_freeze(client, team, sessions, merge_spec(tiny))
    try:
        second = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
        cancelled = client.post(f"/v1/merges/{second['id']}:cancel", headers=team)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_final(client, f"/v1/merges/{first}", team)["state"] == "succeeded"
    later = client.get(f"/v1/merges/{second['id']}", headers=team).json()
    assert later["state"] == "cancelled" and later["attempts"] == 0 and later["started_at"] is None


def test_event_stream_follows_the_job_and_resumes(client, team, tiny, worker) -> None:
    job_id = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()["id"]
    sse = {**team, "Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/merges/{job_id}/events", headers=sse) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())  # the stream ends when the job does
    blocks = [b for b in body.split("\n\n") if b.startswith("id:")]
    ids = [int(b.split("\n")[0].removeprefix("id: ")) for b in blocks]
    assert ids == list(range(1, len(ids) + 1))
    assert '"state":"succeeded"' in blocks[-1].replace(" ", "")

    resumed = client.get(f"/v1/merges/{job_id}/events", headers={**sse, "Last-Event-ID": str(ids[-2])}).text
    assert [b.split("\n")[0] for b in resumed.split("\n\n") if b.startswith("id:")] == [f"id: {ids[-1]}"]


@pytest.fixture(scope="module")
def strict_worker(settings_values, broker_prefix, service_dir):  # type: ignore[no-untyped-def]
    """A worker on its own queue whose jobs may run 2 s (soft limit), then are killed at 6 s (hard limit)."""
    values = {**settings_values, "broker_key_prefix": broker_prefix.replace(":", "-strict:"),
              "task_soft_time_limit": "2", "task_time_limit": "6"}
    process = WorkerProcess(service_env(values), service_dir / "strict-worker.log", "pmtest-strict")
    yield Settings(**values)
    process.stop()


def test_time_limits_fail_the_job(strict_worker, sessions, team, tiny) -> None:
    with TestClient(create_app(strict_worker)) as client:
        # Soft: the job is held past 2 s (the pool checks limits about once a second,
        # so 4 s is surely past); on resuming, the worker stops it and fails it.
        job_id, pid = submit_and_freeze(client, team, sessions, merge_spec(tiny))
        time.sleep(4)
        os.kill(pid, signal.SIGCONT)
        done = wait_final(client, f"/v1/merges/{job_id}", team)
        assert done["state"] == "failed" and done["error"] == "stopped after the time limit of 2 s"

        # Hard: held past 6 s, the process is killed; the job is failed, not redelivered.
        job_id, pid = submit_and_freeze(client, team, sessions, merge_spec(tiny))
        done = wait_final(client, f"/v1/merges/{job_id}", team)
        assert done["state"] == "failed" and done["error"] == "killed after the hard time limit of 6 s"
        assert done["attempts"] == 1
        assert client.get(f"/v1/merges/{job_id}/artifacts", headers=team).json() == {"artifacts": []}
