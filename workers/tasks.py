"""The job task: run one merge or analysis with the engine, writing progress to the database."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

import pivotmerge
from core.db import make_engine, make_sessionmaker
from core.job_states import add_event, current_state, start_attempt, transition
from core.models import ACTIVE_STATES, Artifact, Job, JobKind, JobState, utcnow
from core.settings import Settings
from core.storage import ArtifactStore, artifact_key, file_sha256, make_store
from pivotmerge.errors import MergeCancelled, PivotMergeError
from pivotmerge.progress import Progress
from pivotmerge.repos.output import REPORT_FILE
from pivotmerge.spec.schema import spec_from_dict

from workers.celery_app import RUN_JOB

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
    """The engine's progress callback and cancel check, backed by the job's row."""

    def __init__(self, sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
        self.sessions = sessions
        self.job_id = job_id
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
            session.execute(update(Job).where(Job.id == self.job_id).values(
                progress_fraction=min(max(p.fraction, 0.0), 1.0), progress_stage=p.stage, progress_layer=p.layer,
                progress_message=p.message or None, updated_at=utcnow()))
            add_event(session, self.job_id, "progress", p.as_dict())
            session.commit()

    def should_cancel(self) -> bool:
        # Read on every call, between tensors: a primary-key read is cheap next to merging a tensor.
        with self.sessions() as session:
            return current_state(session, self.job_id) is not JobState.running


def run_engine(kind: JobKind, spec_data: dict[str, Any], out_dir: Path, settings: Settings,
               reporter: JobReporter) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the job; returns (report, metrics) with out_dir holding the files to publish."""
    spec = spec_from_dict(spec_data)
    hooks = dict(progress=reporter.progress, should_cancel=reporter.should_cancel, allowed_roots=settings.allowed_roots)
    if kind is JobKind.merge:
        report = pivotmerge.merge(spec, out_dir, **hooks)
        stored = report.as_json()  # the row holds what merge_report.json holds
        return stored, stored["evaluation"] if report.evaluation is not None else None
    report = pivotmerge.analyze(spec, **hooks)
    out_dir.mkdir(parents=True)
    (out_dir / ANALYSIS_REPORT).write_text(json.dumps(report, indent=2))
    return report, report


def recorded_files(out_dir: Path) -> dict[str, tuple[int, str]]:
    """Size and sha256 of each shard, as the engine's writer computed them while writing (merge_report.json)."""
    report = out_dir / REPORT_FILE
    if not report.is_file():  # an analysis: one small report, hashed below
        return {}
    return {f["name"]: (f["size"], f["sha256"]) for f in json.loads(report.read_text()).get("files", [])}


def publish(ctx: WorkerContext, session: Session, job_id: uuid.UUID, out_dir: Path) -> None:
    """Put every output file in the artifact store and record its size and sha256.

    Shards (gigabytes) reuse the hash the writer computed; only the small side
    files (config, tokenizer, report, card) are hashed here.
    """
    recorded = recorded_files(out_dir)
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        name = path.relative_to(out_dir).as_posix()
        size = path.stat().st_size
        known_size, digest = recorded.get(name, (None, None))
        if known_size != size or digest is None:
            digest = file_sha256(path)
        key = artifact_key(job_id, name)
        ctx.store.put(key, path)
        session.add(Artifact(job_id=job_id, name=name, size=size, sha256=digest, storage_key=key))


def fail(sessions: sessionmaker[Session], job_id: uuid.UUID, error: str) -> None:
    with sessions() as session:
        transition(session, job_id, ACTIVE_STATES, JobState.failed, error=error)
        session.commit()


def cancelled(sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
    with sessions() as session:
        transition(session, job_id, [JobState.cancelling], JobState.cancelled)
        session.commit()


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
            fail(make_sessionmaker(engine), uuid.UUID(args[0]), failure_message(exc, settings))
        finally:
            engine.dispose()


@shared_task(name=RUN_JOB, bind=True, base=JobTask)
def run_job(self: Task, job_id: str) -> None:
    ctx = context()
    jid = uuid.UUID(job_id)
    with ctx.sessions() as session:
        # hostname:pid names the process to look at (or kill) when a job misbehaves.
        run = start_attempt(session, jid, f"{self.request.hostname}:{os.getpid()}", ctx.settings.max_attempts)
        session.commit()
        job = session.get(Job, jid)
    if not run or job is None:
        return

    assert ctx.settings.work_dir is not None
    work = ctx.settings.work_dir / job_id
    succeeded = False
    try:
        shutil.rmtree(work, ignore_errors=True)  # what an attempt whose worker died left behind
        work.mkdir(parents=True)
        reporter = JobReporter(ctx.sessions, jid)
        report, metrics = run_engine(job.kind, job.spec, work / "out", ctx.settings, reporter)
        with ctx.sessions() as session:
            publish(ctx, session, jid, work / "out")
            if transition(session, jid, [JobState.running], JobState.succeeded, report=report,
                          metrics=metrics, progress_fraction=1.0, progress_stage="done"):
                session.commit()
                succeeded = True
        if not succeeded:  # a cancel arrived after the engine's last check: it still wins
            cancelled(ctx.sessions, jid)
    except MergeCancelled:
        cancelled(ctx.sessions, jid)
    except PivotMergeError as exc:
        fail(ctx.sessions, jid, str(exc))
    except Exception as exc:
        if time_limit_in(exc):
            # The limit's signal can cut a query mid-way and leave our connection
            # unusable: JobTask.on_failure records it on a connection of its own.
            raise
        log.exception("job %s failed", job_id)  # a bug, not the user's fault: keep the traceback
        fail(ctx.sessions, jid, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        if not succeeded:  # files a failed or cancelled job had already stored
            ctx.store.delete_prefix(artifact_key(jid, ""))
        shutil.rmtree(work, ignore_errors=True)
