"""The fault run, reduced: merge jobs on real workers whose pool processes and main processes are
SIGKILLed mid-job; every job ends within the lease target, with verified artifacts, none left running."""

from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from safetensors import safe_open
from sqlalchemy import select

from app.main import create_app
from service_core.models import ACTIVE_STATES, Job, JobEvent
from service_core.settings import Settings
from service_core.storage import file_sha256
from tests.repo_factory import llava_like, write_repo
from tests.service.service_support import WorkerProcess, freeze_mid_job, service_env, wait_for
from tests.service.test_service_lease import LEASE_TARGET_SECONDS, parent_pid

pytestmark = pytest.mark.slow

JOBS = 6
# Which process dies, in turn, each time a job is caught running: its pool process, or its worker's main process.
KILLS = ("pool", "main", "pool", "main")


@pytest.fixture(scope="module")
def fault_stack(settings_values, broker_prefix, service_dir) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Three job workers on a queue of their own with a 6 s lease (two will lose their main process, so one
    is left to take their jobs over: no worker restarts to wait for), an API with its reaper on the same settings."""
    values = {**settings_values, "broker_key_prefix": broker_prefix.replace(":", "-faults:"),
              "job_lease_seconds": "6", "lease_check_seconds": "1", "max_attempts": "3"}
    env = service_env(values)
    with ThreadPoolExecutor(3) as pool:  # side by side: each takes seconds of imports
        workers = list(pool.map(lambda i: WorkerProcess(env, service_dir / f"faults-{i}.log", f"pmtest-faults{i}"),
                                range(3)))
    settings = Settings(**values)
    with TestClient(create_app(settings)) as client:
        yield {"client": client, "settings": settings, "workers": workers}
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(WorkerProcess.stop, [w for w in workers if w.process.poll() is None]))


def catch_running(sessions, candidates: list[str]) -> tuple[str, int] | None:  # type: ignore[no-untyped-def]
    """SIGSTOP the process of one of `candidates` caught mid-merge: (job id, pid); None once all have ended."""
    def caught() -> tuple[str, int] | None | bool:
        with sessions() as session:
            rows = session.execute(select(Job.id, Job.state, Job.attempts).where(
                Job.id.in_([uuid.UUID(c) for c in candidates]))).all()
        if all(state not in ACTIVE_STATES for _, state, _ in rows):
            return True  # nothing left to catch
        for job_id, state, attempts in rows:
            if state.value == "running":
                pid = freeze_mid_job(sessions, str(job_id), attempts)
                if pid is not None:
                    return str(job_id), pid
        return None

    found = wait_for(caught, 60, "a job to be caught running", interval=0.005)
    return None if found is True else found


def test_jobs_end_within_the_lease_target_while_workers_are_killed(fault_stack, team, sessions) -> None:  # type: ignore[no-untyped-def]
    client, settings = fault_stack["client"], fault_stack["settings"]
    root = settings.allowed_roots[0] / f"faults-{uuid.uuid4().hex[:6]}"
    base = write_repo(root / "base", llava_like(0, hidden=96, layers=8))
    experts = [write_repo(root / f"e{k}", llava_like(k + 1, hidden=96, layers=8)) for k in range(2)]
    spec = {"method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": {"density": 0.5}, "device": "cpu", "out_shard_size": 100_000}
    began = time.monotonic()
    ids = [client.post("/v1/merges", json=spec, headers=team).json()["id"] for _ in range(JOBS)]

    killed: dict[str, tuple[str, float]] = {}  # job id -> (what was killed, when)
    for what in KILLS:
        caught = catch_running(sessions, [i for i in ids if i not in killed])
        if caught is None:
            break
        job_id, child = caught
        if what == "main":
            main = parent_pid(child)
            assert main in {w.process.pid for w in fault_stack["workers"]}
            os.kill(main, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
        killed[job_id] = (what, time.monotonic())
    assert [what for what, _ in killed.values()] == list(KILLS), killed  # every planned kill hit a running job

    def all_final() -> dict[str, dict] | None:
        jobs = {i: client.get(f"/v1/merges/{i}", headers=team).json() for i in ids}
        return jobs if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values()) else None

    jobs = wait_for(all_final, LEASE_TARGET_SECONDS, "every job to end", interval=0.2)
    ended = time.monotonic()
    print(f"fault run: {len(killed)} kills ({', '.join(w for w, _ in killed.values())}); every job ended "
          f"{ended - max(t for _, t in killed.values()):.1f} s after the last kill, {ended - began:.1f} s after submitting")
    assert ended - max(t for _, t in killed.values()) < LEASE_TARGET_SECONDS
    assert {j["state"] for j in jobs.values()} == {"succeeded"}, jobs
    assert {i: j["attempts"] for i, j in jobs.items()} == {i: 2 if i in killed else 1 for i in ids}

    with sessions() as session:
        assert session.scalar(select(Job.id).where(Job.id.in_([uuid.UUID(i) for i in ids]),
                                                   Job.state.in_(ACTIVE_STATES))) is None  # none stuck
        for job_id, (what, _) in killed.items():
            types = session.scalars(select(JobEvent.type).where(JobEvent.job_id == uuid.UUID(job_id))).all()
            # A dead main process returns its job only through the lease (the broker would take hours).
            assert what == "pool" or "lease" in types, (job_id, what, types)

    with safe_open(base / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for job_id in ids:
        artifacts = client.get(f"/v1/merges/{job_id}/artifacts", headers=team).json()["artifacts"]
        shards = [a for a in artifacts if a["name"].endswith(".safetensors")]
        assert len(shards) > 1
        loaded: set[str] = set()
        for artifact in artifacts:
            path = settings.storage_dir / "jobs" / job_id / artifact["name"]
            assert (path.stat().st_size, file_sha256(path)) == (artifact["size"], artifact["sha256"])
            if artifact in shards:
                with safe_open(path, "pt") as f:
                    loaded |= {name for name in f.keys() if f.get_tensor(name).numel() > 0}
        assert loaded == names
