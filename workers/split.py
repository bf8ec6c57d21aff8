"""Split merges on Celery: a chord of per-shard part tasks, then a finalize task.

One merge is cut by output shard (pivotmerge.split): each part task merges and
writes its shards into a staging folder in the shared artifact store, on
whichever worker takes it; when every part has succeeded the chord's callback
writes the index, side files, report and model card, and moves the folder into
place. Scaling past one machine is adding workers that see the same store.

    celery -A workers.split worker -Q split        # on every machine

Configured by core.settings.Settings: split_broker_url and split_backend_url
(PIVOTMERGE_SPLIT_BROKER_URL, PIVOTMERGE_SPLIT_BACKEND_URL; a chord needs a
result backend, the job worker's app keeps none), both defaulting to the local Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, chord
from celery.result import AsyncResult

from core.settings import Settings
from pivotmerge.plan.plan import as_spec
from pivotmerge.run.split import PartResult, finalize, merge_shards, partition, shard_count

SPLIT_QUEUE = "split"
MERGE_PART = "pivotmerge.run.split.merge_part"
FINALIZE = "pivotmerge.run.split.finalize"


def make_split_celery(settings: Settings) -> Celery:
    app = Celery("pivotmerge-split", broker=settings.split_broker_url, backend=settings.split_backend_url)
    app.conf.update(
        task_default_queue=SPLIT_QUEUE,
        # A part whose worker dies goes back on the queue; its shards are rewritten whole.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


celery = make_split_celery(Settings())


@celery.task(name=MERGE_PART)
def merge_part(spec: dict[str, Any], staging: str, shards: list[int]) -> PartResult:
    """Merge and write `shards` into `staging`; the result names the worker that did it."""
    return {**merge_shards(spec, staging, shards), "worker": f"{socket.gethostname()}:{os.getpid()}"}


@celery.task(name=FINALIZE)
def finalize_parts(parts: list[PartResult], spec: dict[str, Any], staging: str, out_dir: str) -> dict[str, Any]:
    """The chord's callback: finish the merge in `staging`, then move it to `out_dir`."""
    try:
        report = finalize(spec, staging, parts)
        Path(staging).rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out_dir": out_dir, "files": [f.model_dump() for f in report.files], "workers": sorted({p["worker"] for p in parts})}


def split_merge(spec: dict[str, Any], out_dir: str | Path, parts: int, *, queue: str = SPLIT_QUEUE) -> AsyncResult:
    """Queue a merge as `parts` part tasks and a finalize task; returns the finalize task's result.

    The spec is validated (and a mergekit config translated) here, so workers get
    our schema as JSON; `out_dir` must not exist yet and must be on storage every
    worker sees.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists")
    data = as_spec(spec).model_dump(mode="json")
    staging = out_dir.with_name(f".{out_dir.name}.split-{uuid.uuid4().hex[:8]}")
    tasks = [merge_part.s(data, str(staging), shards).set(queue=queue) for shards in partition(shard_count(data), parts)]
    return chord(tasks)(finalize_parts.s(data, str(staging), str(out_dir)).set(queue=queue))
