"""Split merges on Celery: one merge cut by output shard into part tasks, then finalized.

One merge is cut by output shard (pivotmerge.run.split): each part task merges
and writes its shards on whichever worker takes it; when every part has
succeeded, a finalize step writes the index, side files, report and model card.
Scaling past one machine is adding workers:

    celery -A workers.split worker -Q split        # on every machine

Two ways in:

- `split_merge(spec, out_dir, parts)`: a chord of `merge_part` tasks writing into
  a staging folder every worker sees, with `finalize_parts` as its callback.
- The service: a merge job whose spec has `split: N`. The job's worker
  (workers.tasks.run_job, holding the job's lease) coordinates it with
  `run_split_job`: it sends a `job_part` task per part; each part merges in a
  scratch folder of its own worker and puts its shards in the artifact store
  under the job's keys; the coordinator follows the parts through the result
  backend, writes their aggregated progress on the job row, and finalizes once
  every part has succeeded. A part whose pool process dies comes back at once
  (late acknowledgement, reject-on-worker-lost); one whose worker's main
  process died stops beating, and after a lease the coordinator sends it again
  (its broker would only return it after the visibility timeout). Every part
  checks between tensors that the job is still running as its attempt, so a
  cancel, a failure or a requeue stops the parts running and those still queued.

Configured by core.settings.Settings: split_broker_url and split_backend_url
(PIVOTMERGE_SPLIT_BROKER_URL, PIVOTMERGE_SPLIT_BACKEND_URL; a chord and the
coordinator need a result backend, the job worker's app keeps none), both
defaulting to the local Redis; broker_key_prefix applies here too.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from celery import Celery, Task, chord
from celery.result import AsyncResult

from core.db import make_engine, make_sessionmaker
from core.job_states import current_state, runs_as
from core.models import JobState
from core.settings import Settings
from core.storage import artifact_key, make_store
from pivotmerge.errors import MergeCancelled, PivotMergeError
from pivotmerge.plan.plan import as_spec
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.report.merge_report import MergeReport
from pivotmerge.run.split import PartResult, finalize, merge_shards, partition, shard_count

SPLIT_QUEUE = "split"
MERGE_PART = "pivotmerge.run.split.merge_part"
FINALIZE = "pivotmerge.run.split.finalize"
JOB_PART = "pivotmerge.split.job_part"
PART_BEAT_SECONDS = 0.5
# The job's reporter writes progress at most twice a second: one report per poll, on change, is always written.
POLL_SECONDS = 0.5
# The states after which a part's files in the store belong to nobody: the job will never succeed.
ABANDONED = (JobState.cancelling, JobState.cancelled, JobState.failed)


def make_split_celery(settings: Settings) -> Celery:
    # Not the current app: the job worker imports this module beside its own app.
    app = Celery("pivotmerge-split", broker=settings.split_broker_url, backend=settings.split_backend_url,
                 set_as_current=False)
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
        broker_transport_options={"global_keyprefix": settings.broker_key_prefix} if settings.broker_key_prefix else {},
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


# --------------------------------------------------------------------------- service jobs


class PartBeat:
    """While a part runs, its task state is PROGRESS with its worker, a beat counter and its progress.

    Written every PART_BEAT_SECONDS from a thread, so a part busy in one long
    tensor still beats; the coordinator takes a beat that stops for a lease as
    a dead worker.
    """

    def __init__(self, task: Task, task_id: str, worker: str) -> None:
        self.task, self.task_id = task, task_id
        self.meta: dict[str, Any] = {"worker": worker, "beat": 0, "done": 0, "total": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beat-{task_id}", daemon=True)

    def progress(self, p: Progress) -> None:
        self.meta.update(done=p.done, total=p.total)

    def _write(self) -> None:
        self.meta["beat"] += 1
        self.task.update_state(task_id=self.task_id, state="PROGRESS", meta=dict(self.meta))

    def _run(self) -> None:
        while not self._stop.wait(PART_BEAT_SECONDS):
            self._write()

    def __enter__(self) -> "PartBeat":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # Stopped before the task returns, so no beat lands after its final state.
        self._stop.set()
        self._thread.join()


@celery.task(name=JOB_PART, bind=True)
def job_part(self: Task, job_id: str, attempt: int, spec: dict[str, Any], shards: list[int], scratch: str) -> dict[str, Any]:
    """Merge `shards` of the job's `attempt`, put them in the artifact store; the part's result.

    `scratch` is the part's folder under this worker's work_dir. A part whose
    job no longer runs as `attempt` stops, before it starts or between tensors,
    and answers why instead of a result.
    """
    settings = Settings()
    assert settings.work_dir is not None
    worker = f"{self.request.hostname}:{os.getpid()}"
    jid = uuid.UUID(job_id)
    folder = settings.work_dir / scratch
    engine = make_engine(settings.database_url)  # one per part: this may be a freshly forked pool process
    sessions = make_sessionmaker(engine)

    def should_stop() -> bool:
        with sessions() as session:
            return not runs_as(session, jid, attempt)

    stored = False
    try:
        if should_stop():
            return {"worker": worker, "stopped": "before it started: the job no longer runs this attempt"}
        store = make_store(settings)
        with PartBeat(self, self.request.id, worker) as beat:
            shutil.rmtree(folder, ignore_errors=True)  # what a killed run of this part left
            try:
                result = merge_shards(spec, folder, shards, progress=beat.progress, should_cancel=should_stop,
                                      allowed_roots=settings.allowed_roots)
                for f in result["files"]:
                    if should_stop():
                        raise MergeCancelled("merge cancelled")
                    store.put(artifact_key(jid, f["file"]), folder / f["file"])
                    stored = True
            except MergeCancelled:
                return {"worker": worker, "stopped": "mid-way: the job no longer runs this attempt"}
            finally:
                # The job may have been cancelled or failed, and its files removed, after this part's
                # last check but before its last file was stored: then the part removes them.
                if stored:
                    with sessions() as session:
                        if current_state(session, jid) in ABANDONED:
                            store.delete_prefix(artifact_key(jid, ""))
        return {**result, "worker": worker}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        engine.dispose()


@dataclass
class PartRun:
    """One part of a split job, as its coordinator follows it."""

    index: int
    shards: list[int]
    tasks: list[str] = field(default_factory=list)  # every task sent for it; the last is the one followed
    seen: tuple[str, Any, Any] | None = None  # (state, worker, beat) last read
    seen_at: float = 0.0  # when `seen` last changed, on this process's clock
    result: PartResult | None = None

    def describe(self) -> str:
        return f"split part {self.index} (shards {self.shards})"


def run_split_job(job_id: uuid.UUID, attempt: int, spec: dict[str, Any], out_dir: Path, scratch: Path,
                  settings: Settings, progress: ProgressFn, should_cancel: CancelFn,
                  record: Callable[[str, dict[str, Any]], None]) -> MergeReport:
    """Coordinate the job's split merge: send its parts, follow them, then finalize into `out_dir`.

    The parts store the shards; `out_dir` gets the index, side files, report and
    model card. `scratch` is the attempt's scratch folder (the parts' folders go
    under the same name on their workers). Raises MergeCancelled when the job
    stops running as `attempt`, PivotMergeError when a part fails.
    """
    n_shards = shard_count(spec, allowed_roots=settings.allowed_roots)
    runs = [PartRun(i, shards) for i, shards in enumerate(partition(n_shards, spec["split"]))]

    def send(run: PartRun) -> None:
        part_scratch = f"{scratch.relative_to(settings.work_dir)}/part-{run.index}-{len(run.tasks)}"
        sent = job_part.apply_async(args=[str(job_id), attempt, spec, run.shards, part_scratch], queue=SPLIT_QUEUE)
        run.tasks.append(sent.id)
        run.seen, run.seen_at = None, time.monotonic()

    for run in runs:
        send(run)
    record("split", {"shards": n_shards, "parts": [{"part": r.index, "shards": r.shards, "task": r.tasks[-1]}
                                                   for r in runs]})
    last_report: tuple[int, ...] = ()
    while True:
        if should_cancel():
            raise MergeCancelled("merge cancelled")
        for run in runs:
            if run.result is None:
                _follow(run, settings, send, record)
        done = [r for r in runs if r.result is not None]
        running = sorted(r.index for r in runs if r.result is None and r.seen is not None and r.seen[0] == "PROGRESS")
        if (len(done), *running) != last_report:
            last_report = (len(done), *running)
            progress(Progress("merge", sum(len(r.shards) for r in done), n_shards,
                              message=f"{len(done)}/{len(runs)} parts done, {len(running)} running"))
        if len(done) == len(runs):
            break
        time.sleep(POLL_SECONDS)
    progress(Progress("write", 0, 1, message="finalizing: index, side files, report, model card"))
    out_dir.mkdir(parents=True)
    return finalize(spec, out_dir, [r.result for r in runs if r.result is not None],
                    allowed_roots=settings.allowed_roots, shards_in_folder=False)


def _follow(run: PartRun, settings: Settings, send: Callable[[PartRun], None],
            record: Callable[[str, dict[str, Any]], None]) -> None:
    """Read the part's tasks once: take its result, fail on its error, or send it again if its worker died."""
    for task_id in run.tasks:  # any run of the part that succeeded will do: their shards are the same bytes
        result = AsyncResult(task_id, app=celery)
        if result.state == "SUCCESS" and "stopped" not in result.result:
            run.result = result.result
            record("part", {"part": run.index, "state": "succeeded", "worker": result.result["worker"]})
            return
    latest = AsyncResult(run.tasks[-1], app=celery)
    state, info = latest.state, latest.info
    if state == "FAILURE":
        raise PivotMergeError(f"{run.describe()}: {type(info).__name__}: {info}")
    beat = info if state == "PROGRESS" and isinstance(info, dict) else {}
    seen = (state, beat.get("worker"), beat.get("beat"))
    now = time.monotonic()
    if seen != run.seen:
        if beat and (run.seen is None or run.seen[1] != beat["worker"]):
            record("part", {"part": run.index, "state": "running", "worker": beat["worker"]})
        run.seen, run.seen_at = seen, now
    elif beat and now - run.seen_at > settings.job_lease_seconds:
        if len(run.tasks) >= settings.max_attempts:
            raise PivotMergeError(f"{run.describe()}: the worker running it stopped answering {len(run.tasks)} times "
                                  f"(limit: {settings.max_attempts} attempts)")
        record("part", {"part": run.index, "state": "sent again", "worker": beat["worker"],
                        "message": f"its worker stopped beating for {settings.job_lease_seconds} s"})
        send(run)
