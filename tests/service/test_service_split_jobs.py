"""Split merges as jobs: `split: N` runs the merge's parts on split workers (real processes, reading the
`split` queue of the main Celery app; the parts are rows with leases, as trials are), with the
artifact store on local disk or on a real S3 server (moto) on loopback; parts killed mid-merge are run
again, and every output file is byte-identical to a single-worker merge of the same spec."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
import pytest
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import select

import pivotmerge
from app.job_streaming import download_artifact
from app.main import create_app
from service_core.models import Artifact, Job, SplitPart
from service_core.settings import Settings
from service_core.storage import CHUNK, make_store
from tests.repo_factory import llava_like, write_repo
from tests.service.service_support import WorkerProcess, service_env, wait_final, wait_for
from tests.service.test_service_lease import parent_pid
from tests.service.test_service_storage_and_schema import s3_endpoint  # noqa: F401  (the moto server fixture)
from pivotmerge.run.split import partition
from workers.kinds.merge import MERGE

pytestmark = pytest.mark.slow

# Files that differ between any two merges: the report and the card carry times and the spec as given.
TIMED = {"merge_report.json", "README.md"}
SHARD_BYTES = 1_500_000  # 6 matrices of 256 x 256 float32 a shard: over one download chunk (1 MiB)
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def models(settings: Settings) -> dict[str, Any]:
    """A base and two experts, big enough that a part of a TSV merge runs for about a second."""
    root = settings.allowed_roots[0] / f"split-{uuid.uuid4().hex[:6]}"
    base = write_repo(root / "base", llava_like(0, hidden=256, layers=16), extra_files={"tokenizer.json": "{}"})
    experts = [write_repo(root / f"e{k}", llava_like(k + 1, hidden=256, layers=16)) for k in range(2)]
    return {"method": "tsv", "base_model": str(base), "models": [{"model": str(e)} for e in experts], "device": "cpu",
            "out_shard_size": SHARD_BYTES}


def merged_whole(spec: dict[str, Any], out: Path) -> tuple[dict[str, str], dict]:
    """The merge run whole in one process: sha256 of each file, and its report."""
    report = pivotmerge.merge(spec, out)
    return {p.name: sha256(p.read_bytes()) for p in out.iterdir() if p.name not in TIMED}, report.as_json()


@pytest.fixture(scope="module")
def whole(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict]:
    return merged_whole(models, tmp_path_factory.mktemp("whole") / "out")


@pytest.fixture(scope="module")
def one_matrix_shards(models: dict[str, Any]) -> dict[str, Any]:
    """The same merge written one matrix a shard: a part then spends most of its run with some shards
    stored, so the kill test catches two parts mid-merge however fast the machine (with 1.5 MB shards
    a part stored its last shard 10 ms after its first, and a loaded run could miss both windows)."""
    return {**models, "out_shard_size": 270_000}


@pytest.fixture(scope="module")
def whole_one_matrix_shards(one_matrix_shards: dict[str, Any],
                            tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict]:
    return merged_whole(one_matrix_shards, tmp_path_factory.mktemp("whole-small") / "out")


def start_workers(specs: list[tuple[dict[str, str], Path, str, str]]) -> list[WorkerProcess]:
    """Start the worker processes side by side (each takes seconds of imports)."""
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(lambda s: WorkerProcess(s[0], s[1], s[2], queues=s[3]), specs))


def stop_workers(workers: list[WorkerProcess]) -> None:
    with ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(WorkerProcess.stop, [w for w in workers if w.process.poll() is None]))


@pytest.fixture(scope="module")
def local_split_workers(settings_values, service_dir, worker) -> Iterator[list[WorkerProcess]]:  # type: ignore[no-untyped-def]
    """Two split workers beside the session's job worker: local artifact store, the session's broker prefix."""
    env = service_env(settings_values)
    workers = start_workers([(env, service_dir / f"split-local-{i}.log", f"pmtest-split-local{i}", "split")
                             for i in range(2)])
    yield workers
    stop_workers(workers)


@pytest.fixture(scope="module")
def s3_stack(settings_values, broker_prefix, service_dir, s3_endpoint) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]  # noqa: F811
    """A job worker, two split workers and an API, all on a bucket of the S3 server, with a 6 s lease."""
    bucket = f"split-{uuid.uuid4().hex[:8]}"
    values = {**settings_values, "broker_key_prefix": broker_prefix.replace(":", "-split:"), "storage": "s3",
              "s3_bucket": bucket, "s3_endpoint_url": s3_endpoint, "job_lease_seconds": "6",
              "lease_check_seconds": "1", "max_attempts": "3"}
    with pytest.MonkeyPatch.context() as env_patch:
        for name, value in AWS.items():
            env_patch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        s3.create_bucket(Bucket=bucket)
        env = {**service_env(values), **AWS}
        workers = start_workers([(env, service_dir / "split-s3-job.log", "pmtest-split-s3job", "gpu")]
                                + [(env, service_dir / f"split-s3-{i}.log", f"pmtest-split-s3{i}", "split")
                                   for i in range(2)])
        settings = Settings(**values)
        with TestClient(create_app(settings)) as client:
            yield {"client": client, "settings": settings, "s3": s3, "bucket": bucket, "job_worker": workers[0],
                   "split_workers": workers[1:]}
        stop_workers(workers)


def events_of(client: TestClient, job_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    return client.get(f"/v1/merges/{job_id}/events", headers=headers).json()["events"]


def part_tasks(client: TestClient, job_id: str, headers: dict[str, str]) -> list[str]:
    """The part tasks the job's worker sent, from its `split` event."""
    def sent() -> list[str] | None:
        split = [e for e in events_of(client, job_id, headers) if e["type"] == "split"]
        return [p["task"] for p in split[0]["data"]["parts"]] if split else None

    return wait_for(sent, 60, f"{job_id} to send its parts", interval=0.05)


def parts(sessions, job_id: str) -> list[SplitPart]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(SplitPart).where(SplitPart.job_id == uuid.UUID(job_id))
                                    .order_by(SplitPart.part)))


def freeze_running_parts(sessions, job_id: str, tasks: list[str], count: int) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    """SIGSTOP the pool processes of `count` parts caught mid-merge (running, some shards stored), each
    kept frozen while the next is sought: [(task id, pid)] in the order caught."""
    frozen: list[tuple[str, int]] = []

    def caught() -> bool:
        for row in parts(sessions, job_id):
            task_id = tasks[row.part]
            if task_id in {t for t, _ in frozen} or row.state != "running" or not row.done:
                continue
            pid = int(row.worker.rpartition(":")[2])
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # a beat left by a process already gone
                continue
            if parts(sessions, job_id)[row.part].state == "running":  # frozen before it finished
                frozen.append((task_id, pid))
                if len(frozen) == count:
                    return True
            else:
                os.kill(pid, signal.SIGCONT)
        return False

    wait_for(caught, 60, f"{count} parts to be caught mid-merge", interval=0.01)
    return frozen


async def collect(response: StreamingResponse) -> list[bytes]:
    return [bytes(chunk) async for chunk in response.body_iterator]


def check_outputs(artifacts: list[dict[str, Any]], read: Callable[[str], bytes],
                  whole: tuple[dict[str, str], dict]) -> dict:
    """Every stored file hashes to its record; all but the timed ones are the whole merge's bytes. The report."""
    files, whole_report = whole
    contents = {a["name"]: read(a["name"]) for a in artifacts}
    assert {n: sha256(c) for n, c in contents.items()} == {a["name"]: a["sha256"] for a in artifacts}
    assert {n: len(c) for n, c in contents.items()} == {a["name"]: a["size"] for a in artifacts}
    assert {n: sha256(c) for n, c in contents.items() if n not in TIMED} == files
    assert len([n for n in files if n.endswith(".safetensors")]) >= 4 and "model.safetensors.index.json" in files
    report = json.loads(contents["merge_report.json"])
    assert report["files"] == whole_report["files"] and report["layers"] == whole_report["layers"]
    return report


def test_split_is_validated_with_the_spec(queue_only_client, team, models) -> None:  # type: ignore[no-untyped-def]
    client = queue_only_client
    for bad, message in [({"split": 0}, "greater than or equal to 1"), ({"split": 10**400}, "less than or equal to 1024"),
                         ({"split": 2, "evaluate": [{"dataset": "x.jsonl"}]}, "data-free spec"),
                         ({"split": 2, "push_to_hub": {"repo_id": "org/m"}}, "cannot push_to_hub")]:
        response = client.post("/v1/merges", json={**models, **bad}, headers=team)
        assert response.status_code == 422 and response.json()["field"] == "split", response.text
        assert message in response.json()["detail"]
    analysis = client.post("/v1/analyses", json={**models, "split": 2}, headers=team)
    assert analysis.status_code == 422 and analysis.json() == {
        "detail": "split: only a merge can be split, not an analysis", "field": "split"}
    accepted = client.post("/v1/merges", json={**models, "split": 2}, headers=team)
    assert accepted.status_code == 202 and accepted.json()["spec"]["split"] == 2
    client.post(f"/v1/merges/{accepted.json()['id']}:cancel", headers=team)


def test_local_split_job_matches_one_merge_and_streams_its_downloads(  # type: ignore[no-untyped-def]
        client, team, sessions, settings, models, whole, local_split_workers) -> None:
    started = time.monotonic()
    job = client.post("/v1/merges", json={**models, "split": 3}, headers=team).json()
    done = wait_final(client, f"/v1/merges/{job['id']}", team, timeout=120)
    print(f"local split job: {time.monotonic() - started:.1f} s")
    assert done["state"] == "succeeded", done
    assert (done["progress"]["fraction"], done["progress"]["stage"], done["attempts"]) == (1.0, "done", 1)

    artifacts = client.get(f"/v1/merges/{job['id']}/artifacts", headers=team).json()["artifacts"]
    report = check_outputs(artifacts, lambda name: client.get(f"/v1/merges/{job['id']}/artifacts/{name}",
                                                              headers=team).content, whole)
    assert report["spec"]["split"] == 3

    events = events_of(client, job["id"], team)
    split = next(e["data"] for e in events if e["type"] == "split")
    assert [p["shards"] for p in split["parts"]] == partition(split["shards"], 3) and split["shards"] >= 6
    finished_by = {e["data"]["worker"] for e in events if e["type"] == "part" and e["data"]["state"] == "succeeded"}
    assert len([e for e in events if e["type"] == "part" and e["data"]["state"] == "succeeded"]) == 3
    assert {w.rpartition("@")[0] for w in finished_by} <= {"pmtest-split-local0", "pmtest-split-local1"}
    merge_progress = [e["data"] for e in events if e["type"] == "progress" and e["data"]["stage"] == "merge"]
    assert [p["done"] for p in merge_progress] == sorted(p["done"] for p in merge_progress)
    assert merge_progress[-1]["done"] == merge_progress[-1]["total"] == split["shards"]
    assert merge_progress[-1]["message"].startswith("3/3 parts done")
    wait_for(lambda: not [p for p in settings.work_dir.iterdir() if p.name.startswith(job["id"])], 10,
             "the scratch folders to be removed")

    # A local download is a stream of at most one chunk at a time, with Range and a strong ETag.
    shard = max((a for a in artifacts if a["name"].endswith(".safetensors")), key=lambda a: a["size"])
    assert shard["size"] > CHUNK
    whole_bytes = client.get(shard["url"], headers=team).content
    part = client.get(shard["url"], headers={**team, "Range": f"bytes=100-{CHUNK + 99}"})
    assert part.status_code == 206 and part.content == whole_bytes[100:CHUNK + 100]
    assert part.headers["ETag"] == f'"{shard["sha256"]}"'
    assert part.headers["Content-Range"] == f"bytes 100-{CHUNK + 99}/{shard['size']}"
    assert client.get(shard["url"], headers={**team, "If-None-Match": f'"{shard["sha256"]}"'}).status_code == 304
    with sessions() as session:
        job_row = session.get(Job, uuid.UUID(job["id"]))
        response = download_artifact(MERGE, job_row, shard["name"], session, make_store(settings), None, None)
    assert isinstance(response, StreamingResponse)
    chunks = asyncio.run(collect(response))
    assert len(chunks) == -(-shard["size"] // CHUNK) and max(len(c) for c in chunks) == CHUNK
    assert b"".join(chunks) == whole_bytes


def test_cancel_stops_the_remaining_parts(s3_stack, team, sessions, models) -> None:  # type: ignore[no-untyped-def]
    client, s3, bucket = s3_stack["client"], s3_stack["s3"], s3_stack["bucket"]
    job = client.post("/v1/merges", json={**models, "split": 6}, headers=team).json()
    tasks = part_tasks(client, job["id"], team)
    assert len(tasks) == 6
    wait_for(lambda: any(row.state == "succeeded" for row in parts(sessions, job["id"])), 60, "a part to finish")
    assert client.post(f"/v1/merges/{job['id']}:cancel", headers=team).status_code == 200
    done = wait_final(client, f"/v1/merges/{job['id']}", team)
    assert done["state"] == "cancelled"

    def every_part_ended() -> list[SplitPart] | None:
        rows = parts(sessions, job["id"])
        return rows if all(r.state in ("succeeded", "stopped", "failed") for r in rows) else None

    outcomes = wait_for(every_part_ended, 60, "every part to end")
    stopped = [o.message for o in outcomes if o.state == "stopped"]
    assert any(s.startswith("before it started") for s in stopped), outcomes  # queued parts never merged
    assert len(stopped) < 6  # and some had finished before the cancel
    # The job's worker removes the files it stored right after it recorded the end of the job.
    wait_for(lambda: s3.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{job['id']}/")["KeyCount"] == 0, 10,
             "the stored shards to be removed")
    assert client.get(f"/v1/merges/{job['id']}/artifacts", headers=team).json() == {"artifacts": []}


def test_s3_split_job_survives_killed_part_processes(  # type: ignore[no-untyped-def]
        s3_stack, team, sessions, one_matrix_shards, whole_one_matrix_shards) -> None:
    """One part's pool process and another part's worker main process are SIGKILLed mid-merge."""
    client, settings = s3_stack["client"], s3_stack["settings"]
    s3, bucket = s3_stack["s3"], s3_stack["bucket"]
    job = client.post("/v1/merges", json={**one_matrix_shards, "split": 3}, headers=team).json()
    tasks = part_tasks(client, job["id"], team)
    (child_task, child), (main_task, frozen) = freeze_running_parts(sessions, job["id"], tasks, 2)

    # A pool process: its worker puts the part back on the queue at once (late ack, reject on worker lost).
    os.kill(child, signal.SIGKILL)
    # A worker's main process: nothing returns its part but the job's worker, once the part stops beating.
    main = parent_pid(frozen)
    assert main in {w.process.pid for w in s3_stack["split_workers"]}
    os.kill(main, signal.SIGKILL)
    os.kill(frozen, signal.SIGKILL)
    killed_at = time.monotonic()

    done = wait_final(client, f"/v1/merges/{job['id']}", team, timeout=120)
    print(f"s3 split job with two parts killed: ended {time.monotonic() - killed_at:.1f} s after the kills")
    assert done["state"] == "succeeded", done
    events = events_of(client, job["id"], team)
    finished = {e["data"]["part"]: e["data"]["worker"] for e in events
                if e["type"] == "part" and e["data"]["state"] == "succeeded"}
    assert sorted(finished) == [0, 1, 2]
    for task_id, pid in ((child_task, child), (main_task, frozen)):
        part = tasks.index(task_id)
        assert not finished[part].endswith(f":{pid}")  # run again, by another process
    resent = {e["data"]["part"]: e["data"]["worker"] for e in events
              if e["type"] == "part" and e["data"]["state"] == "sent again"}
    assert resent[tasks.index(main_task)].endswith(f":{frozen}")  # after it stopped beating

    # The job's own lease held while it waited on its parts (longer than a lease): one attempt, never requeued.
    assert done["attempts"] == 1 and "lease" not in [e["type"] for e in events]
    with sessions() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert (row.finished_at - row.started_at).total_seconds() > settings.job_lease_seconds
        keys = {a.name: a.storage_key for a in session.scalars(select(Artifact).where(Artifact.job_id == row.id))}

    artifacts = client.get(f"/v1/merges/{job['id']}/artifacts", headers=team).json()["artifacts"]
    check_outputs(artifacts, lambda name: s3.get_object(Bucket=bucket, Key=keys[name])["Body"].read(),
                  whole_one_matrix_shards)
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"jobs/{job['id']}/")["Contents"]}
    assert stored == set(keys.values())
