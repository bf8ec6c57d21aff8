"""The embedded default and the admin CLI, as a user runs them (`pivotmerge quickstart`: tests/cli/test_quickstart.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from click.testing import CliRunner

from app.cli import admin, free_port, stop_process
from service_core.db import make_engine, make_sessionmaker
from service_core.models import FINAL_STATES, Job
from tests.repo_factory import llava_like, write_repo
from tests.service.service_support import freeze_mid_job, wait_for
from tests.service.test_service_lease import LEASE_TARGET_SECONDS, parent_pid

FINAL = {s.value for s in FINAL_STATES}


def test_admin_creates_teams_and_keys_that_the_api_accepts(client, settings_values, monkeypatch) -> None:
    for name, value in settings_values.items():
        monkeypatch.setenv(f"PIVOTMERGE_{name.upper()}", value)
    runner = CliRunner()
    created = runner.invoke(admin, ["create-team", "vision-lab-admin-test"])
    assert created.exit_code == 0, created.output
    key = re.search(r"API key: (\S+)", created.output).group(1)
    assert client.get("/v1/merges", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    twice = runner.invoke(admin, ["create-team", "vision-lab-admin-test"])
    assert twice.exit_code == 1 and "already exists" in twice.output

    key_id = re.search(r"key id (\S+)", created.output).group(1)
    assert runner.invoke(admin, ["revoke-key", key_id]).exit_code == 0
    assert client.get("/v1/merges", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    listing = runner.invoke(admin, ["list-teams"]).output
    assert "vision-lab-admin-test" in listing and "revoked" in listing and key not in listing


def ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_job_whose_embedded_worker_was_killed_runs_again(tmp_path: Path) -> None:
    """`pivotmerge serve` (SQLite database and broker): the lease reaper requeues the job, serve starts a new worker."""
    data = tmp_path / "service"
    base = write_repo(data / "models" / "base", llava_like(0, hidden=64, layers=6))
    experts = [write_repo(data / "models" / f"e{k}", llava_like(k + 1, hidden=64, layers=6)) for k in range(2)]
    spec = {"method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "device": "cpu"}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env.update(PIVOTMERGE_DATA_DIR=str(data), PIVOTMERGE_JOB_LEASE_SECONDS="3", PIVOTMERGE_LEASE_CHECK_SECONDS="1")
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "serve",
                               "--port", str(port)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_for(lambda: server.poll() is not None or ready(http), 120, "the embedded service to start", 0.2)
            assert server.poll() is None, log.read_text()[-3000:]
            http.headers["Authorization"] = f"Bearer {(data / 'api-key').read_text().strip()}"
            engine = make_engine(f"sqlite:///{data / 'pivotmerge.db'}")
            sessions = make_sessionmaker(engine)
            for _ in range(10):
                job_id = http.post("/v1/merges", json=spec).json()["id"]
                child = freeze_mid_job(sessions, job_id, 1)
                if child is not None:
                    break
                wait_for(lambda: http.get(f"/v1/merges/{job_id}").json()["state"] == "succeeded", 60, "the merge")
            else:
                raise AssertionError("no job could be caught running")
            main = parent_pid(child)
            os.kill(main, signal.SIGKILL)  # the worker serve started: its pool child dies with it
            killed_at = time.monotonic()
            done = wait_for(lambda: (job := http.get(f"/v1/merges/{job_id}").json())["state"] in FINAL and job,
                            LEASE_TARGET_SECONDS, "the job to end")
            elapsed = time.monotonic() - killed_at
            events = http.get(f"/v1/merges/{job_id}/events").json()["events"]
    finally:
        stop_process(server, timeout=40)
    assert (done["state"], done["attempts"]) == ("succeeded", 2), done
    assert "lease" in [e["type"] for e in events]  # requeued by the reaper, not by the broker
    assert "starting a new one" in log.read_text()
    with sessions() as session:
        assert session.get(Job, uuid.UUID(job_id)).worker.rpartition(":")[2] != str(child)
    engine.dispose()
    print(f"embedded: killed worker -> job succeeded on a new worker after {elapsed:.1f} s")
