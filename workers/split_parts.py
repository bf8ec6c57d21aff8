"""Split merges as jobs: a merge job whose spec has `split: N` fans its parts out as tuning trials are
fanned out, as rows in the database (core.split_parts) and tasks on the main Celery app:

    celery -A workers.worker worker -Q split -c 1        # as many as you like, on any host

The job's worker (workers.tasks.run_job, holding the job's lease) coordinates it with `run_split_job`:
it writes a row and sends a `run_split_part` task per part (pivotmerge.run.split cuts the merge by output
shard); each part merges in a scratch folder of its own worker and puts its shards in the artifact store
under the job's keys; the coordinator follows the rows, writes their aggregated progress on the job row,
and finalizes once every part has succeeded. A part whose pool process dies comes back at once (late
acknowledgement, reject-on-worker-lost) and its next delivery takes it over; one whose worker's main
process died stops renewing its lease, and the coordinator sends it again. Every part checks between
tensors that the job is still running as its attempt, so a cancel, a failure or a requeue stops the
parts running and those still queued.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Task, current_app, shared_task

from core.heartbeat import Heartbeat
from core.job_states import current_state, runs_as
from core.models import Job, JobState, SplitPart, utcnow
from core.settings import Settings
from core.split_parts import create_parts, end_part, parts_of, renew_part, requeue_lapsed, sent, start_part
from core.storage import artifact_key
from pivotmerge.errors import MergeCancelled, PivotMergeError
from pivotmerge.progress import Progress
from pivotmerge.report.merge_report import MergeReport
from pivotmerge.run.split import PartResult, finalize, merge_shards, partition, shard_count
from pivotmerge.spec.schema import MergeSpec, spec_from_dict

from workers.celery_app import RUN_SPLIT_PART, enqueue_split_part
from workers.context import JobHooks, WorkerContext, context, dead_local_owner, worker_name

# A part's beat renews its lease and records its progress; the coordinator reads the rows as often.
PART_BEAT_SECONDS = 0.5
POLL_SECONDS = 0.5
# The states after which a part's files in the store belong to nobody: the job will never succeed.
ABANDONED = (JobState.cancelling, JobState.cancelled, JobState.failed)


def part_scratch(scratch: str, part: int, starts: int) -> str:
    return f"{scratch}/part-{part}-{starts}"


class PartRun:
    """This worker's run of one part: its lease beat (with its progress), its stop check, how it ended."""

    def __init__(self, ctx: WorkerContext, job_id: uuid.UUID, part: int, attempt: int, worker: str) -> None:
        self.ctx, self.job_id, self.part, self.attempt, self.worker = ctx, job_id, part, attempt, worker
        self.progress = Progress("merge", 0, 0)
        self.lost = False  # the part was sent again, or the job moved on: this run writes nothing more
        self.stored = False

    def track(self, p: Progress) -> None:
        self.progress = p

    def beat(self) -> bool:
        with self.ctx.sessions() as session:
            self.lost = not renew_part(session, self.job_id, self.part, self.attempt, self.worker,
                                       self.ctx.settings.job_lease_seconds, self.progress.done, self.progress.total)
            session.commit()
        return not self.lost

    def should_stop(self) -> bool:
        if self.lost:
            return True
        with self.ctx.sessions() as session:
            return not runs_as(session, self.job_id, self.attempt)

    def end(self, state: str, result: dict[str, Any] | None = None, message: str | None = None) -> None:
        with self.ctx.sessions() as session:
            end_part(session, self.job_id, self.part, self.attempt, self.worker, state, result=result, message=message)
            session.commit()

    def merge_and_store(self, spec: MergeSpec, shards: list[int], folder: Path) -> PartResult:
        """Merge the shards into `folder` and put them in the store, beating meanwhile."""
        with Heartbeat(f"part-{self.job_id}-{self.part}", PART_BEAT_SECONDS, self.beat, first_now=True):
            shutil.rmtree(folder, ignore_errors=True)  # what a killed run of this part left
            result = merge_shards(spec, folder, shards, progress=self.track, should_cancel=self.should_stop,
                                  allowed_roots=self.ctx.settings.allowed_roots)
            for f in result["files"]:
                if self.should_stop():
                    raise MergeCancelled("merge cancelled")
                self.ctx.store.put(artifact_key(self.job_id, f["file"]), folder / f["file"])
                self.stored = True
        return {**result, "worker": self.worker}

    def remove_abandoned_files(self) -> None:
        # The job may have been cancelled or failed, and its files removed, after this part's
        # last check but before its last file was stored: then the part removes them.
        if not self.stored:
            return
        with self.ctx.sessions() as session:
            if current_state(session, self.job_id) in ABANDONED:
                self.ctx.store.delete_prefix(artifact_key(self.job_id, ""))


@shared_task(name=RUN_SPLIT_PART, bind=True)
def run_split_part(self: Task, job_id: str, attempt: int, part: int, scratch: str) -> None:
    """Merge the part's shards for the job's `attempt` and put them in the artifact store; its row says how it ended.

    `scratch` is the job attempt's scratch folder name; the part's folder goes under it on this worker.
    A part whose job no longer runs as `attempt` stops, before it starts or between tensors.
    """
    ctx = context()
    assert ctx.settings.work_dir is not None
    jid = uuid.UUID(job_id)
    run = PartRun(ctx, jid, part, attempt, worker_name(self.request.hostname))
    with ctx.sessions() as session:
        previous = session.get(SplitPart, (jid, part))
        row = start_part(session, jid, part, attempt, run.worker, ctx.settings.job_lease_seconds,
                         ctx.settings.max_attempts, dead_owner=dead_local_owner(previous.worker if previous else None))
        session.commit()
        if row is None:  # ended, taken by another live worker, or of an attempt the job no longer runs
            return
        shards, spec = row.shards, spec_from_dict(session.get_one(Job, jid).spec)
        folder = ctx.settings.work_dir / part_scratch(scratch, part, row.starts)
    if run.should_stop():
        run.end("stopped", message="before it started: the job no longer runs this attempt")
        return
    try:
        run.end("succeeded", result=run.merge_and_store(spec, shards, folder))
    except MergeCancelled:
        run.end("stopped", message="mid-way: the job no longer runs this attempt")
    except Exception as exc:  # an error, not a death: the coordinator fails the job, naming the part
        run.end("failed", message=f"{type(exc).__name__}: {exc}")
    finally:
        run.remove_abandoned_files()
        shutil.rmtree(folder, ignore_errors=True)


def describe(row: SplitPart) -> str:
    return f"split part {row.part} (shards {row.shards})"


class Coordinator:
    """One attempt's split job, as its worker follows the part rows: events, progress, parts sent again."""

    def __init__(self, job: JobHooks, settings: Settings, scratch: str) -> None:
        self.job, self.settings, self.scratch = job, settings, scratch
        self.seen_workers: dict[int, str | None] = {}
        self.announced: set[int] = set()
        self.last_report: tuple[int, ...] = ()

    def send(self, part: int) -> str:
        task_id = enqueue_split_part(current_app, self.job.job_id, self.job.attempt, part, self.scratch)
        with self.job.sessions() as session:
            sent(session, self.job.job_id, part, self.job.attempt, task_id)
            session.commit()
        return task_id

    def follow(self, row: SplitPart) -> None:
        """Look at one part's row: announce its worker or its end, fail on its error, send it again if its worker died."""
        if row.state == "failed":
            raise PivotMergeError(f"{describe(row)}: {row.message}")
        if row.state == "succeeded" and row.result is not None and row.part not in self.announced:
            self.announced.add(row.part)
            self.job.event("part", {"part": row.part, "state": "succeeded", "worker": row.result["worker"]})
        if row.state != "running":
            return
        if self.seen_workers.get(row.part) != row.worker:
            self.seen_workers[row.part] = row.worker
            self.job.event("part", {"part": row.part, "state": "running", "worker": row.worker})
        if row.lease_expires_at is not None and row.lease_expires_at < utcnow():
            if row.starts >= self.settings.max_attempts:
                raise PivotMergeError(f"{describe(row)}: the worker running it stopped answering {row.starts} times "
                                      f"(limit: {self.settings.max_attempts} attempts)")
            with self.job.sessions() as session:
                requeued = requeue_lapsed(session, self.job.job_id, row.part, self.job.attempt, row.worker)
                session.commit()
            if requeued:
                self.job.event("part", {"part": row.part, "state": "sent again", "worker": row.worker,
                                        "message": f"its worker stopped beating for {self.settings.job_lease_seconds} s"})
                self.seen_workers.pop(row.part, None)
                self.send(row.part)

    def report(self, rows: list[SplitPart], n_shards: int) -> None:
        done = [r for r in rows if r.state == "succeeded"]
        running = sorted(r.part for r in rows if r.state == "running")
        if (len(done), *running) != self.last_report:
            self.last_report = (len(done), *running)
            self.job.progress(Progress("merge", sum(len(r.shards) for r in done), n_shards,
                                       message=f"{len(done)}/{len(rows)} parts done, {len(running)} running"))


def run_split_job(job: JobHooks, spec: MergeSpec, out_dir: Path, scratch: Path, settings: Settings) -> MergeReport:
    """Coordinate the job's split merge: send its parts, follow them, then finalize into `out_dir`.

    The parts store the shards; `out_dir` gets the index, side files, report and model card. `scratch`
    is the attempt's scratch folder (the parts' folders go under the same name on their workers).
    Raises MergeCancelled when the job stops running as its attempt, PivotMergeError when a part fails.
    """
    assert settings.work_dir is not None and spec.split is not None
    n_shards = shard_count(spec, allowed_roots=settings.allowed_roots)
    shards = partition(n_shards, spec.split)
    with job.sessions() as session:
        create_parts(session, job.job_id, job.attempt, shards)
        session.commit()
    coordinator = Coordinator(job, settings, scratch.relative_to(settings.work_dir).as_posix())
    tasks = [coordinator.send(part) for part in range(len(shards))]
    job.event("split", {"shards": n_shards, "parts": [{"part": i, "shards": s, "task": t}
                                                      for i, (s, t) in enumerate(zip(shards, tasks))]})
    while True:
        if job.should_cancel():
            raise MergeCancelled("merge cancelled")
        with job.sessions() as session:
            rows = parts_of(session, job.job_id, job.attempt)
        for row in rows:
            coordinator.follow(row)
        coordinator.report(rows, n_shards)
        if all(r.state == "succeeded" for r in rows):
            break
        time.sleep(POLL_SECONDS)
    job.progress(Progress("write", 0, 1, message="finalizing: index, side files, report, model card"))
    out_dir.mkdir(parents=True)
    return finalize(spec, out_dir, [r.result for r in rows if r.result is not None],
                    allowed_roots=settings.allowed_roots, shards_in_folder=False)
