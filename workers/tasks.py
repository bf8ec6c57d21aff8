"""The job task: run one job of any declared kind (workers.kinds), writing progress to the database."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service_core.db import make_engine, make_sessionmaker
from service_core.heartbeat import Heartbeat
from service_core.logs import bind_job
from service_core.job_states import add_event, current_state, holds_lease, renew_lease, runs_as, start_attempt, transition
from service_core.models import ACTIVE_STATES, FINAL_STATES, Artifact, Job, JobState, utcnow
from service_core.settings import Settings
from service_core.storage import artifact_key, file_sha256, make_store
from service_core.team_queues import dispatch_once
from pivotmerge.errors import MergeCancelled, PivotMergeError, RepoError
from pivotmerge.progress import Progress
from pivotmerge.repos.hub import push
from pivotmerge.spec.schema import MergeSpec

from workers.celery_app import RUN_JOB, enqueue_job
from workers.context import WorkerContext, context, dead_local_owner, worker_name
from workers.kinds import JobKind, JobRun, Outcome, load_kinds
from workers.split_parts import run_split_job

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.5


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


def lease_keeper(reporter: JobReporter, lease_seconds: int) -> Heartbeat:
    """Renews the attempt's lease every third of its length; once the job is no longer ours, says so and stops."""

    def renew() -> bool:
        with reporter.sessions() as session:
            renewed = renew_lease(session, reporter.job_id, reporter.attempt, lease_seconds)
            session.commit()
        if not renewed:
            reporter.lost.set()
        return renewed

    return Heartbeat(f"lease-{reporter.job_id}", lease_seconds / 3, renew)


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


def run_kind(kind: JobKind, request: Any, work: Path, settings: Settings, reporter: JobReporter) -> Outcome:
    """Run the job as its kind declares; a split spec of a kind that can split runs as parts instead."""
    spec = kind.merge_spec_of(request)
    if kind.can_split and spec is not None and spec.split is not None:  # the parts store the shards; out_dir gets the rest
        report = run_split_job(reporter, spec, work / "out", work, settings)
        return Outcome(report.as_json(), shards_stored=True)
    return kind.run(JobRun(request, work / "out", work, settings, reporter))


def push_merge(sessions: sessionmaker[Session], job_id: uuid.UUID, spec: MergeSpec, out_dir: Path,
               settings: Settings) -> None:
    """Upload a finished merge to the hub repo its spec names, as `pivotmerge push` does; the commit is a job event."""
    target = spec.push_to_hub
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


def publish(ctx: WorkerContext, session: Session, job_id: uuid.UUID, out_dir: Path, outcome: Outcome) -> None:
    """Put every output file in the artifact store and record its size and sha256.

    Shards (gigabytes) reuse the hash the writer computed, as the run's report lists them (`files`, as in
    merge_report.json); only the small side files (config, tokenizer, report, card) are hashed here. With
    `shards_stored`, the shards the report lists are in the store already (a split merge's parts put them
    there) and are only recorded.
    """
    recorded = {f["name"]: (f["size"], f["sha256"]) for f in outcome.report.get("files", [])}
    for name, (size, digest) in recorded.items() if outcome.shards_stored else ():
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
        attempt = start_attempt(session, jid, worker_name(self.request.hostname), ctx.settings.max_attempts,
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
        with lease_keeper(reporter, ctx.settings.job_lease_seconds):
            work.mkdir(parents=True)
            kind = {k.name: k for k in load_kinds(ctx.settings.job_kind_modules)}[job.kind]
            request = kind.parse(job.spec)  # parsed once: the run and the push read the same request
            outcome = run_kind(kind, request, work, ctx.settings, reporter)
            if kind.can_push and (spec := kind.merge_spec_of(request)) is not None:
                push_merge(ctx.sessions, jid, spec, work / "out", ctx.settings)
            with ctx.sessions() as session:
                publish(ctx, session, jid, work / "out", outcome)
                if transition(session, jid, [JobState.running], JobState.succeeded, report=outcome.report,
                              metrics=outcome.metrics, progress_fraction=1.0, progress_stage="done",
                              only_if=holds_lease(attempt)):
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
        dispatch_to_free_workers(self, ctx)


def dispatch_to_free_workers(task: Task, ctx: WorkerContext) -> None:
    """A job ended, so a worker slot is free: run a dispatch pass now rather than wait for the API's next tick."""
    try:
        dispatch_once(ctx.sessions, lambda job_id: enqueue_job(task.app, job_id), ctx.settings)
    except Exception:  # the database or the broker is away: the API's dispatcher tries again
        log.warning("could not dispatch waiting jobs after a job ended", exc_info=True)
