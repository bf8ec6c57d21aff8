"""The job task: run one merge or analysis with the engine, writing progress to the database."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

import pivotmerge
from core.db import make_engine, make_sessionmaker
from core.logs import bind_job
from core.job_states import add_event, current_state, holds_lease, renew_lease, runs_as, start_attempt, transition
from core.models import ACTIVE_STATES, FINAL_STATES, Artifact, Job, JobKind, JobState, utcnow
from core.settings import Settings
from core.storage import ArtifactStore, artifact_key, file_sha256, make_store
from pivotmerge.errors import MergeCancelled, PivotMergeError, RepoError
from pivotmerge.progress import Progress
from pivotmerge.repos.hub import push
from pivotmerge.repos.output import REPORT_FILE
from pivotmerge.spec.schema import spec_from_dict

from workers.celery_app import RUN_JOB
from workers.split import run_split_job
from workers.tuning import run_tuning

log = logging.getLogger(__name__)

ANALYSIS_REPORT = "analysis_report.json"
PROGRESS_INTERVAL_SECONDS = 0.5


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    pid: int


_context: WorkerContext | None = None


def context() -> WorkerContext:
    """Settings, database and store of this process; rebuilt in a forked child, which must not share connections."""
    global _context
    if _context is None or _context.pid != os.getpid():
        settings = Settings()
        _context = WorkerContext(settings, make_sessionmaker(make_engine(settings.database_url)),
                                 make_store(settings), os.getpid())
    return _context


class JobReporter:
    """The engine's progress callback and cancel check, backed by the job's row, for one attempt.

    Writes are fenced by the attempt number: once the reaper has requeued the
    job or another worker has taken it over, this attempt writes nothing more
    and its cancel check says stop.
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.lost = threading.Event()  # set by the lease keeper when the job is no longer ours
        self._last_write = 0.0
        self._stage: str | None = None

    def progress(self, p: Progress) -> None:
        # Every stage change and the end of a stage are written; in between, at
        # most twice a second, so a model of thousands of tensors does not
        # write thousands of rows.
        now = time.monotonic()
        if p.stage == self._stage and p.done < p.total and now - self._last_write < PROGRESS_INTERVAL_SECONDS:
            return
        self._stage, self._last_write = p.stage, now
        with self.sessions() as session:
            written = session.execute(update(Job).where(Job.id == self.job_id, holds_lease(self.attempt)).values(
                progress_fraction=min(max(p.fraction, 0.0), 1.0), progress_stage=p.stage, progress_layer=p.layer,
                progress_message=p.message or None, updated_at=utcnow())).rowcount
            if written:
                add_event(session, self.job_id, "progress", p.as_dict())
            session.commit()

    def should_cancel(self) -> bool:
        # Read on every call, between tensors: a primary-key read is cheap next to merging a tensor.
        if self.lost.is_set():
            return True
        with self.sessions() as session:
            return not runs_as(session, self.job_id, self.attempt)

    def event(self, type: str, data: dict[str, Any]) -> None:
        """Record a job event (a split merge's parts), unless the job is no longer this attempt's."""
        if still_holds(self.sessions, self.job_id, self.attempt):
            with self.sessions() as session:
                add_event(session, self.job_id, type, data)
                session.commit()


class LeaseKeeper:
    """A thread that renews the attempt's lease every third of its length, until stopped."""

    def __init__(self, reporter: JobReporter, lease_seconds: int) -> None:
        self.reporter = reporter
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{reporter.job_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        r = self.reporter
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with r.sessions() as session:
                    renewed = renew_lease(session, r.job_id, r.attempt, self.lease_seconds)
                    session.commit()
            except Exception:  # a database hiccup: try again at the next beat, the lease has slack
                log.warning("job %s: could not renew the lease", r.job_id, exc_info=True)
                continue
            if not renewed:
                r.lost.set()
                return


def dead_local_owner(worker: str | None) -> str | None:
    """`worker` ("node@host:pid") if it names a process of this host that no longer exists.

    A pool child killed mid-job is redelivered at once, while its lease still
    runs: this lets the new delivery take over without waiting for the lease.
    """
    if not worker or ":" not in worker:
        return None
    node, _, pid = worker.rpartition(":")
    if node.rpartition("@")[2] != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return worker
    except PermissionError:  # alive, someone else's
        return None
    return None


def scratch_folder(work_dir: Path, job_id: uuid.UUID, attempt: int) -> Path:
    return work_dir / f"{job_id}.{attempt}"


def sweep_scratch(work_dir: Path, sessions: sessionmaker[Session]) -> None:
    """Remove scratch folders no attempt will use again: of finished or unknown jobs, and superseded attempts.

    Run at worker start-up and before each job, so the folders of an attempt
    whose worker died are removed even when the job is never run again.
    """
    if not work_dir.is_dir():
        return
    folders = {}
    for entry in work_dir.iterdir():
        job_part, _, attempt = entry.name.partition(".")
        try:
            folders[entry] = (uuid.UUID(job_part), int(attempt))
        except ValueError:
            continue  # not ours
    if not folders:
        return
    with sessions() as session:
        jobs = {row.id: row for row in session.execute(select(Job.id, Job.state, Job.attempts).where(
            Job.id.in_({job_id for job_id, _ in folders.values()})))}
    for entry, (job_id, attempt) in folders.items():
        job = jobs.get(job_id)
        if job is None or job.state in FINAL_STATES or attempt < job.attempts:
            shutil.rmtree(entry, ignore_errors=True)


def run_engine(kind: JobKind, spec_data: dict[str, Any], out_dir: Path, settings: Settings,
               reporter: JobReporter) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the job; returns (report, metrics) with out_dir holding the files to publish."""
    if kind is JobKind.tuning:  # its spec is a tuning request (core.tunings)
        return run_tuning(spec_data, out_dir, settings, reporter)
    spec = spec_from_dict(spec_data)
    if is_split(kind, spec_data):  # the parts store the shards; out_dir gets the rest
        report = run_split_job(reporter.job_id, reporter.attempt, spec_data, out_dir, out_dir.parent, settings,
                               reporter.progress, reporter.should_cancel, reporter.event)
        return report.as_json(), None
    hooks = dict(progress=reporter.progress, should_cancel=reporter.should_cancel, allowed_roots=settings.allowed_roots,
                 allow_downloads=settings.hub_allow_downloads)
    if kind is JobKind.merge:
        report = pivotmerge.merge(spec, out_dir, **hooks)
        stored = report.as_json()  # the row holds what merge_report.json holds
        return stored, stored["evaluation"] if report.evaluation is not None else None
    report = pivotmerge.analyze(spec, **hooks)
    out_dir.mkdir(parents=True)
    (out_dir / ANALYSIS_REPORT).write_text(json.dumps(report, indent=2))
    return report, report


def is_split(kind: JobKind, spec_data: dict[str, Any]) -> bool:
    """A merge whose parts run on the split workers (workers.split)."""
    return kind is JobKind.merge and spec_data.get("split") is not None


def push_merge(sessions: sessionmaker[Session], job_id: uuid.UUID, spec_data: dict[str, Any], out_dir: Path,
               settings: Settings) -> None:
    """Upload a finished merge to the hub repo its spec names, as `pivotmerge push` does; the commit is a job event."""
    target = spec_from_dict(spec_data).push_to_hub
    if target is None:
        return
    token = settings.hub_token.get_secret_value() if settings.hub_token else None
    try:
        info = push(out_dir, target.repo_id, token=token, private=target.private, endpoint=settings.hub_endpoint)
    except (SoftTimeLimitExceeded, TimeLimitExceeded):
        raise
    except Exception as exc:  # huggingface_hub and httpx raise many types; the job fails with one line
        raise RepoError(f"push_to_hub: {target.repo_id}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    with sessions() as session:
        add_event(session, job_id, "pushed", {"repo_id": target.repo_id, "commit": info.oid, "url": info.commit_url})
        session.commit()


def recorded_files(out_dir: Path) -> dict[str, tuple[int, str]]:
    """Size and sha256 of each shard, as the engine's writer computed them while writing (merge_report.json)."""
    report = out_dir / REPORT_FILE
    if not report.is_file():  # an analysis: one small report, hashed below
        return {}
    return {f["name"]: (f["size"], f["sha256"]) for f in json.loads(report.read_text()).get("files", [])}


def publish(ctx: WorkerContext, session: Session, job_id: uuid.UUID, out_dir: Path, shards_stored: bool = False) -> None:
    """Put every output file in the artifact store and record its size and sha256.

    Shards (gigabytes) reuse the hash the writer computed; only the small side
    files (config, tokenizer, report, card) are hashed here. With
    `shards_stored`, the shards the report lists are in the store already (a
    split merge's parts put them there) and are only recorded.
    """
    recorded = recorded_files(out_dir)
    for name, (size, digest) in recorded.items() if shards_stored else ():
        session.add(Artifact(job_id=job_id, name=name, size=size, sha256=digest, storage_key=artifact_key(job_id, name)))
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        name = path.relative_to(out_dir).as_posix()
        size = path.stat().st_size
        known_size, digest = recorded.get(name, (None, None))
        if known_size != size or digest is None:
            digest = file_sha256(path)
        key = artifact_key(job_id, name)
        ctx.store.put(key, path)
        session.add(Artifact(job_id=job_id, name=name, size=size, sha256=digest, storage_key=key))


def fail(sessions: sessionmaker[Session], job_id: uuid.UUID, error: str, attempt: int | None = None) -> None:
    with sessions() as session:
        transition(session, job_id, ACTIVE_STATES, JobState.failed, error=error,
                   only_if=None if attempt is None else holds_lease(attempt))
        session.commit()


def cancelled(sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int) -> None:
    with sessions() as session:
        transition(session, job_id, [JobState.cancelling], JobState.cancelled, only_if=holds_lease(attempt))
        session.commit()


def still_holds(sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int) -> bool:
    with sessions() as session:
        return session.scalar(select(Job.attempts).where(Job.id == job_id)) == attempt


def time_limit_in(exc: BaseException | None) -> BaseException | None:
    """The time limit behind `exc`, if any: it may surface as the error of whatever it interrupted."""
    while exc is not None and not isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
        exc = exc.__context__
    return exc


def failure_message(exc: BaseException, settings: Settings) -> str:
    limit = time_limit_in(exc)
    if isinstance(limit, SoftTimeLimitExceeded):
        return f"stopped after the time limit of {settings.task_soft_time_limit} s"
    if isinstance(limit, TimeLimitExceeded):
        return f"killed after the hard time limit of {settings.task_time_limit} s"
    return f"the worker gave up on the job: {type(exc).__name__}: {exc}"


class JobTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: ExceptionInfo) -> None:
        # Records time limits and whatever else escapes run_job, on an engine of
        # its own: the job's connection may be broken, and for the hard limit
        # this runs in the worker's parent, whose connections children would inherit.
        settings = Settings()
        engine = make_engine(settings.database_url)
        try:
            job_id, sessions = uuid.UUID(args[0]), make_sessionmaker(engine)
            fail(sessions, job_id, failure_message(exc, settings))
            with sessions() as session:
                ended = current_state(session, job_id) in (JobState.failed, JobState.cancelled)
            if ended:  # it may have been killed publishing; a job that succeeded keeps its files
                make_store(settings).delete_prefix(artifact_key(job_id, ""))
        finally:
            engine.dispose()


@shared_task(name=RUN_JOB, bind=True, base=JobTask)
def run_job(self: Task, job_id: str) -> None:
    ctx = context()
    jid = uuid.UUID(job_id)
    assert ctx.settings.work_dir is not None
    sweep_scratch(ctx.settings.work_dir, ctx.sessions)
    with ctx.sessions() as session:
        previous = session.scalar(select(Job.worker).where(Job.id == jid))
        # hostname:pid names the process to look at (or kill) when a job misbehaves.
        attempt = start_attempt(session, jid, f"{self.request.hostname}:{os.getpid()}", ctx.settings.max_attempts,
                                ctx.settings.job_lease_seconds, dead_owner=dead_local_owner(previous))
        session.commit()
        job = session.get(Job, jid)
    bind_job(jid, job.team_id if job else None, attempt)  # every line logged from here on says which job
    log.info("delivery of job %s: %s", jid, f"attempt {attempt}" if attempt else "not run")
    if attempt is None or job is None:  # finished, cancelled, or a duplicate delivery of a job another worker holds
        if job is not None and job.state in (JobState.cancelled, JobState.failed):
            ctx.store.delete_prefix(artifact_key(jid, ""))  # its dead attempt may have died publishing
        return

    work = scratch_folder(ctx.settings.work_dir, jid, attempt)
    reporter = JobReporter(ctx.sessions, jid, attempt)
    succeeded = False
    try:
        with LeaseKeeper(reporter, ctx.settings.job_lease_seconds):
            work.mkdir(parents=True)
            report, metrics = run_engine(job.kind, job.spec, work / "out", ctx.settings, reporter)
            if job.kind is JobKind.merge:  # a tuning's spec is a tuning request, and nothing else pushes
                push_merge(ctx.sessions, jid, job.spec, work / "out", ctx.settings)
            with ctx.sessions() as session:
                publish(ctx, session, jid, work / "out", shards_stored=is_split(job.kind, job.spec))
                if transition(session, jid, [JobState.running], JobState.succeeded, report=report, metrics=metrics,
                              progress_fraction=1.0, progress_stage="done", only_if=holds_lease(attempt)):
                    session.commit()
                    succeeded = True
            if not succeeded:  # a cancel arrived after the engine's last check: it still wins
                cancelled(ctx.sessions, jid, attempt)
    except MergeCancelled:
        cancelled(ctx.sessions, jid, attempt)
    except PivotMergeError as exc:
        fail(ctx.sessions, jid, str(exc), attempt)
    except Exception as exc:
        if time_limit_in(exc):
            # The limit's signal can cut a query mid-way and leave our connection
            # unusable: JobTask.on_failure records it on a connection of its own.
            raise
        log.exception("job %s failed", job_id)  # a bug, not the user's fault: keep the traceback
        fail(ctx.sessions, jid, f"internal error: {type(exc).__name__}: {exc}", attempt)
    finally:
        # Files a failed or cancelled attempt had already stored, unless the job is another attempt's now.
        if not succeeded and still_holds(ctx.sessions, jid, attempt):
            ctx.store.delete_prefix(artifact_key(jid, ""))
        shutil.rmtree(work, ignore_errors=True)
        # And the folder of an attempt whose worker died while this one ran (the job is over, or ours now).
        try:
            sweep_scratch(ctx.settings.work_dir, ctx.sessions)
        except Exception:  # the database is away: the next job's sweep, or the worker's restart, does it
            log.warning("job %s: could not sweep scratch folders", jid, exc_info=True)
        log.info("attempt %s of job %s ended%s", attempt, jid, " with success" if succeeded else "")
