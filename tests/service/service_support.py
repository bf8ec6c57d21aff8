"""Helpers for the service tests: waiting on jobs, starting worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from service_core.db import migrate
from service_core.models import FINAL_STATES, Job


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_final(client: TestClient, url: str, headers: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = client.get(url, headers=headers).json()
        return job if job["state"] in {s.value for s in FINAL_STATES} else None

    return wait_for(final, timeout, f"{url} to finish", interval=0.1)


def merge_spec(example: Any, method: str = "task_arithmetic", **extra: Any) -> dict[str, Any]:
    return {"method": method, "base_model": str(example.base), "models": [{"model": str(p)} for p in example.experts],
            "device": "cpu", **extra}


def freeze_mid_job(sessions, job_id: str, attempt: int) -> int | None:
    """SIGSTOP the process running the job's `attempt`-th attempt while the job is mid-way.

    Returns its pid, or None when the job finished before it could be caught.
    The process is frozen holding no lock on the job row, so the API can still
    update the row; an in-flight write is let through first.
    """
    def started() -> Job | None:
        with sessions() as session:
            job = session.get(Job, uuid.UUID(job_id))
            return job if job.attempts >= attempt and job.state.value != "queued" else None

    job = wait_for(started, 60, f"attempt {attempt} of {job_id} to start", interval=0.005)
    if job.state.value != "running" or job.attempts != attempt:
        return None
    pid = int(job.worker.rsplit(":", 1)[1])
    while True:
        os.kill(pid, signal.SIGSTOP)
        with sessions() as session:
            try:
                state = session.scalars(select(Job.state).where(Job.id == job.id).with_for_update(nowait=True)).one()
            except OperationalError:  # frozen inside a write: let it finish
                session.rollback()
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.002)
                continue
        if state.value == "running":
            return pid
        os.kill(pid, signal.SIGCONT)
        return None


def submit_and_freeze(client, team, sessions, spec) -> tuple[str, int]:
    """Submit merges until one is caught mid-way (a tiny merge can finish before it is seen running)."""
    for _ in range(10):
        job_id = client.post("/v1/merges", json=spec, headers=team).json()["id"]
        pid = freeze_mid_job(sessions, job_id, 1)
        if pid is not None:
            return job_id, pid
        wait_final(client, f"/v1/merges/{job_id}", team)
    raise AssertionError("no job could be caught running")


class WorkerProcess:
    """A real `celery worker` process on the gpu queue (or the queues given: split, trials),
    as a deployment runs it."""

    def __init__(self, env: dict[str, str], log: Path, name: str, queues: str = "gpu") -> None:
        self.log = log
        command = [sys.executable, "-m", "celery", "-A", "workers.worker", "worker", "-Q", queues, "-c", "1",
                   "--pool", "prefork", "-n", f"{name}@%h", "-l", "info",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[2])
        wait_for(lambda: " ready." in log.read_text() or self.process.poll() is not None, 90, "the worker to start", 0.2)
        assert self.process.poll() is None, f"worker exited:\n{log.read_text()[-3000:]}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def service_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment for a worker process: ours without stray PIVOTMERGE_* values, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env.update({f"PIVOTMERGE_{k.upper()}": v for k, v in settings.items()})
    return env


@contextmanager
def migrated_database(pg_admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh database `<prefix><random>` on the test server, migrated to head; dropped on exit. Its URL."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{pg_admin_url.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    migrate(url)
    try:
        yield url
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
