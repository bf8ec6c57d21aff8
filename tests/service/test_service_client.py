"""pivotmerge.client and `pivotmerge jobs ...` against the real API served by uvicorn on loopback."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
import yaml

from app.main import create_app
from pivotmerge.client import Client, ClientError
from tests.service.service_support import merge_spec, wait_for


@pytest.fixture(scope="module")
def api_url(settings) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings.model_copy(update={"housekeeping": False}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn to start", interval=0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def cli(args: list[str], url: str, team: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env["PIVOTMERGE_URL"] = url
    if team:
        env["PIVOTMERGE_API_KEY"] = team["Authorization"].removeprefix("Bearer ")
    return subprocess.run(["pivotmerge", "jobs", *args], env=env, capture_output=True, text=True, timeout=180)


def test_jobs_commands_submit_watch_list_download_cancel(api_url, team, tiny, worker, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(merge_spec(tiny)))
    submitted = cli(["submit", str(spec_file), "--label", "project=client-test"], api_url, team)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    watched = cli(["watch", job_id], api_url, team)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.strip() == f"{job_id} succeeded"

    listed = cli(["list", "--label", "project=client-test"], api_url, team)
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [job_id]
    assert "succeeded" in listed.stdout and "project=client-test" in listed.stdout

    out = tmp_path / "merged"
    downloaded = cli(["download", job_id, "-o", str(out)], api_url, team)
    assert downloaded.returncode == 0, downloaded.stderr
    artifacts = httpx.get(f"{api_url}/v1/merges/{job_id}/artifacts", headers=team).json()["artifacts"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == \
        {a["name"]: a["sha256"] for a in artifacts}

    refused = cli(["cancel", job_id], api_url, team)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"merge {job_id} has already succeeded" in refused.stderr


def test_download_resumes_a_partial_file_with_range(api_url, team, tiny, worker, tmp_path: Path) -> None:
    requests: list[httpx.Request] = []
    client = Client(api_url, team["Authorization"].removeprefix("Bearer "),
                    http=httpx.Client(event_hooks={"request": [requests.append]}))
    job = client.submit(merge_spec(tiny))
    events = list(client.follow(job["id"]))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["state"] == "succeeded"

    client.download(job["id"], tmp_path)
    shard = max(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # an interrupted download
    requests.clear()
    client.download(job["id"], tmp_path)
    assert shard.read_bytes() == whole
    ranges = [r.headers.get("Range") for r in requests if r.url.path.endswith(shard.name)]
    assert ranges == [f"bytes={len(whole) // 2}-"]


def test_client_errors_are_one_line(api_url, team, tmp_path: Path) -> None:
    with pytest.raises(ClientError) as missing:
        Client(api_url, team["Authorization"].removeprefix("Bearer ")).get("00000000-0000-0000-0000-000000000000")
    assert missing.value.status == 404 and "not found" in str(missing.value)
    no_key = cli(["list"], api_url, None)
    assert no_key.returncode == 2 and "PIVOTMERGE_API_KEY" in no_key.stderr and no_key.stderr.count("\n") == 1
    nobody = cli(["list"], "http://127.0.0.1:9", team)
    assert nobody.returncode == 2 and "cannot reach" in nobody.stderr and "Traceback" not in nobody.stderr
