"""Job leases: a job whose worker's main process died runs again (or fails) within the lease target;
duplicate deliveries are dropped; scratch folders of abandoned attempts are removed."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.auth import create_team
from app.main import create_app
from app.housekeeping import reap_once
from core.job_states import add_event, start_attempt
from core.models import Job, JobEvent, JobState, utcnow
from core.settings import Settings
from core.storage import artifact_key, make_store
from tests.service.service_support import WorkerProcess, freeze_mid_job, merge_spec, service_env, wait_final, wait_for
from workers.celery_app import make_celery
from workers.tasks import scratch_folder, sweep_scratch

LEASE_TARGET_SECONDS = 60  # the target, with the default lease (15 s) and reaper period (5 s)


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def two_workers(settings_values, broker_prefix, service_dir) -> Iterator[tuple[Settings, list[WorkerProcess]]]:
    """Two workers on a queue of their own, with the default lease settings."""
    values = {**settings_values, "broker_key_prefix": broker_prefix.replace(":", "-lease:")}
    workers = [WorkerProcess(service_env(values), service_dir / f"lease-worker-{i}.log", f"pmtest-lease{i}")
               for i in range(2)]
    yield Settings(**values), workers
    for w in workers:
        if w.process.poll() is None:
            w.stop()


def test_a_job_whose_worker_main_process_was_killed_runs_again_within_the_target(two_workers, sessions, tiny) -> None:
    settings, workers = two_workers
    assert settings.job_lease_seconds == 15 and settings.lease_check_seconds == 5  # the defaults
    with TestClient(create_app(settings)) as client:
        team = _team(sessions)
        for _ in range(10):
            job_id = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()["id"]
            child = freeze_mid_job(sessions, job_id, 1)
            if child is not None:
                break
            wait_final(client, f"/v1/merges/{job_id}", team)
        else:
            raise AssertionError("no job could be caught running")
        main = parent_pid(child)
        assert main in {w.process.pid for w in workers}
        with sessions() as session:
            killed_node = session.get(Job, uuid.UUID(job_id)).worker.rpartition(":")[0]
        os.kill(main, signal.SIGKILL)  # the worker's main process: its pool child dies with it
        killed_at = time.monotonic()

        def running_again() -> dict | None:
            job = client.get(f"/v1/merges/{job_id}", headers=team).json()
            return job if job["attempts"] == 2 and job["state"] in ("running", "succeeded") else None

        wait_for(running_again, LEASE_TARGET_SECONDS, "the job to run again on the other worker", interval=0.2)
        elapsed = time.monotonic() - killed_at
        done = wait_final(client, f"/v1/merges/{job_id}", team)
    assert elapsed < LEASE_TARGET_SECONDS
    assert done["state"] == "succeeded" and done["attempts"] == 2
    with sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job.worker.rpartition(":")[0] != killed_node  # the other worker ran it
        types = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job.id).order_by(JobEvent.seq)).all()
    assert "lease" in types
    # The killed attempt's scratch folder (a half-written shard) went when the job ended on the other worker.
    assert not list(settings.work_dir.glob(f"{job_id}.*"))
    print(f"killed worker main process -> job running again after {elapsed:.1f} s")


def _team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from app.auth import create_api_key

    with sessions() as session:
        team = create_team(session, f"lease-{uuid.uuid4().hex[:8]}")
        _, key = create_api_key(session, team)
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def _job(sessions, **values) -> uuid.UUID:  # type: ignore[no-untyped-def]
    with sessions() as session:
        team = create_team(session, f"lease-{uuid.uuid4().hex[:8]}")
        job = Job(team_id=team.id, kind="merge", spec={}, request_sha256="0" * 64, **values)
        session.add(job)
        session.commit()
        return job.id


def test_a_duplicate_delivery_of_a_job_another_worker_holds_is_dropped(sessions) -> None:
    job_id = _job(sessions, state=JobState.running, attempts=1, worker="other@host:1",
                  lease_expires_at=utcnow() + timedelta(seconds=30))
    with sessions() as session:
        assert start_attempt(session, job_id, "me@host:2", max_attempts=3, lease_seconds=30) is None
        session.commit()
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.worker) == (JobState.running, 1, "other@host:1")
        # ...but once the holder is known dead (a pool child killed on this host), it is taken over at once.
        assert start_attempt(session, job_id, "me@host:2", 3, 30, dead_owner="other@host:1") == 2
        session.commit()
        session.refresh(job)
        assert (job.state, job.attempts, job.worker) == (JobState.running, 2, "me@host:2")


def test_the_reaper_requeues_fails_or_cancels_jobs_whose_lease_lapsed(settings, sessions, tmp_path: Path) -> None:
    lapsed = utcnow() - timedelta(seconds=1)
    requeue = _job(sessions, state=JobState.running, attempts=1, worker="w@h:1", lease_expires_at=lapsed)
    exhausted = _job(sessions, state=JobState.running, attempts=settings.max_attempts, worker="w@h:1",
                     lease_expires_at=lapsed)
    cancelling = _job(sessions, state=JobState.cancelling, attempts=1, worker="w@h:1", lease_expires_at=lapsed)
    alive = _job(sessions, state=JobState.running, attempts=1, worker="w@h:1",
                 lease_expires_at=utcnow() + timedelta(seconds=30))
    for job_id in (requeue, exhausted, cancelling, alive):
        with sessions() as session:
            add_event(session, job_id, "state", {"state": "queued"})
            session.commit()
    # What each dead attempt had stored (it may have died publishing): a job the reaper ends keeps none of it.
    store = make_store(settings)
    for job_id in (requeue, exhausted, cancelling, alive):
        side_file = tmp_path / f"{job_id}.json"
        side_file.write_text("{}")
        store.put(artifact_key(job_id, "config.json"), side_file)  # moved into the store
    # A broker no worker reads: the requeued message is sent, nothing runs it.
    unread = settings.model_copy(update={"broker_key_prefix": f"unread-{uuid.uuid4().hex[:6]}:"})
    requeued = reap_once(sessions, make_celery(unread), store, settings.max_attempts)
    assert requeue in requeued and exhausted not in requeued
    stored = {j for j in (requeue, exhausted, cancelling, alive) if (settings.storage_dir / artifact_key(j, "")).exists()}
    assert stored == {requeue, alive}
    with sessions() as session:
        state = {j: session.get(Job, j) for j in (requeue, exhausted, cancelling, alive)}
        assert (state[requeue].state, state[requeue].worker, state[requeue].lease_expires_at) == (JobState.queued, None, None)
        assert state[exhausted].state is JobState.failed
        assert f"stopped answering {settings.max_attempts} times" in state[exhausted].error
        assert state[cancelling].state is JobState.cancelled
        assert state[alive].state is JobState.running


def test_scratch_folders_of_attempts_that_will_not_run_again_are_swept(settings, sessions, tmp_path: Path) -> None:
    failed = _job(sessions, state=JobState.failed, attempts=2)
    running = _job(sessions, state=JobState.running, attempts=2)
    folders = {
        "failed": scratch_folder(tmp_path, failed, 2),
        "superseded": scratch_folder(tmp_path, running, 1),
        "current": scratch_folder(tmp_path, running, 2),
        "unknown": scratch_folder(tmp_path, uuid.uuid4(), 1),
        "not ours": tmp_path / "something-else",
    }
    for folder in folders.values():
        (folder / "out").mkdir(parents=True)
    sweep_scratch(tmp_path, sessions)
    assert {name for name, folder in folders.items() if folder.exists()} == {"current", "not ours"}
