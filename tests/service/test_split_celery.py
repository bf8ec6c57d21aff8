"""A split merge run by two real Celery worker processes equals a single-process merge."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

import pivotmerge
from tests.repo_factory import llava_like, write_repo
from tests.engine.test_split_merge import weight_files

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def split_env(redis_url: str) -> dict[str, str]:
    """The broker, result backend and key prefix of this process's split app, for its workers.

    `workers.split.celery` is configured when the module is first imported (another test module
    may import it while being collected), before the test servers are known: it is pointed at the
    test Redis here, before it first connects; the test's own queue keeps its tasks apart.
    """
    from workers.split import celery

    celery.conf.update(broker_url=redis_url, result_backend=redis_url)
    redis.Redis.from_url(celery.conf.broker_url).ping()
    return {"PIVOTMERGE_SPLIT_BROKER_URL": celery.conf.broker_url, "PIVOTMERGE_SPLIT_BACKEND_URL": celery.conf.result_backend,
            "PIVOTMERGE_BROKER_KEY_PREFIX": (celery.conf.broker_transport_options or {}).get("global_keyprefix", "")}


@pytest.fixture
def two_workers(split_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """Two worker processes (one task at a time each) on a queue of this test's own."""
    queue = f"split-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **split_env, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.split", "worker", "-Q", queue, "-c", "1",
                               "-n", f"{queue}-{i}@%h", "--pool", "solo", "--without-gossip", "--without-mingle",
                               "-l", "warning"], cwd=ROOT, env=env, stdout=open(tmp_path / f"worker{i}.log", "wb"),
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        from workers.split import celery

        deadline = time.monotonic() + 90  # as the service fixtures wait: start-up under a loaded CI machine
        while len(celery.control.ping(destination=[f"{queue}-{i}@{os.uname().nodename}" for i in range(2)], timeout=1)) < 2:
            assert time.monotonic() < deadline, "workers did not start"
        yield queue
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_chord_of_two_workers_writes_the_same_bytes_as_one_merge(two_workers: str, tmp_path: Path):
    from workers.split import split_merge

    base = write_repo(tmp_path / "base", llava_like(0, hidden=32, layers=6), extra_files={"tokenizer.json": "{}"})
    experts = [write_repo(tmp_path / f"e{k}", llava_like(k + 1, hidden=32, layers=6)) for k in range(3)]
    spec = {"method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": {"density": 0.5}, "dtype": "bfloat16", "out_shard_size": 8000, "device": "cpu"}
    whole = tmp_path / "whole"
    pivotmerge.merge(spec, whole)

    result = split_merge(spec, tmp_path / "split", parts=4, queue=two_workers).get(timeout=120)

    assert weight_files(tmp_path / "split") == weight_files(whole)
    assert len(result["workers"]) == 2, result["workers"]  # both processes merged parts
    assert (tmp_path / "split" / "merge_report.json").is_file()
    assert not list(tmp_path.glob(".split.split-*"))
