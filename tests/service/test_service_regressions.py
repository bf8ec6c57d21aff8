"""Defects found under fire (50 jobs, random SIGKILLs of workers, bad inputs), and friction a new user met
with `pivotmerge serve`, each pinned by a test.

The lease-time and scratch-folder ones are in test_service_lease.py, beside the kill they need.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import update

from app.cli import start_embedded_service, stop_process, wait_until_ready
from core.models import Job, JobState, utcnow
from core.storage import artifact_key, make_store
from pivotmerge.data.example import make_example
from tests.service.service_support import merge_spec, wait_for
from tests.service.test_service_webhooks import Receiver
from workers.celery_app import enqueue_job


def test_a_400_digit_shard_size_is_a_422_naming_the_field(client, team, tiny) -> None:
    response = client.post("/v1/merges", json=merge_spec(tiny, out_shard_size="9" * 400 + "GB"), headers=team)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "out_shard_size"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_job_cancelled_while_its_dead_worker_was_publishing_keeps_no_files(client, queue_only_client, team, tiny,
                                                                            sessions, settings, worker,
                                                                            tmp_path: Path) -> None:
    """The attempt was killed mid-publish with a cancel in flight; the broker redelivers its message to a worker."""
    job_id = queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()["id"]
    store = make_store(settings)
    for name in ("config.json", "README.md"):  # what publish had put in the store before the kill
        side_file = tmp_path / name
        side_file.write_text("{}")
        store.put(artifact_key(job_id, name), side_file)
    with sessions() as session:  # attempt 1 ran in a process of this host that is gone; its lease still runs
        session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(
            state=JobState.cancelling, attempts=1, worker=f"killed@{socket.gethostname()}:{dead_pid()}",
            lease_expires_at=utcnow() + timedelta(seconds=600)))
        session.commit()
    enqueue_job(client.app.state.celery, uuid.UUID(job_id))  # the redelivery, to the session's real worker

    wait_for(lambda: client.get(f"/v1/merges/{job_id}", headers=team).json()["state"] == "cancelled", 60,
             "the redelivery to end the job")
    wait_for(lambda: not (settings.storage_dir / artifact_key(job_id, "")).exists(), 10, "the stored files to go")


def test_webhooks_fire_from_the_embedded_service(tmp_path: Path) -> None:
    """`pivotmerge serve` with no configuration: its worker reads the webhook queue too."""
    data = tmp_path / "service"
    example = make_example(data / "models" / "tiny", n_experts=2)
    server, url, log = start_embedded_service(data, webhook_allow_private_addresses="true")
    receiver = Receiver([])
    try:
        wait_until_ready(server, url, data / "api-key", log)
        with httpx.Client(base_url=url, timeout=30) as http:
            http.headers["Authorization"] = f"Bearer {(data / 'api-key').read_text().strip()}"
            hook = http.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.succeeded"]})
            assert hook.status_code == 201, hook.text
            job_id = http.post("/v1/merges", json=merge_spec(example)).json()["id"]
            wait_for(lambda: receiver.received, 90, "the job.succeeded delivery", 0.2)
            deliveries = wait_for(lambda: [d for d in http.get(f"/v1/webhooks/{hook.json()['id']}/deliveries").json()
                                           ["deliveries"] if d["state"] == "succeeded"], 10, "the delivery's record")
    finally:
        receiver.close()
        stop_process(server)
    _, headers, body = receiver.received[0]
    assert headers["PivotMerge-Event"] == "job.succeeded" and job_id.encode() in body
    assert [(d["job_id"], d["attempts"], d["last_status_code"]) for d in deliveries] == [(job_id, 1, 200)]


def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_2_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
        env["PIVOTMERGE_DATA_DIR"] = str(tmp_path / "service")
        result = subprocess.run([sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "serve",
                                 "--port", str(port)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not (tmp_path / "service").exists()  # no database, no key, no worker
