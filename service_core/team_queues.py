"""Team queues in the database: jobs wait here until the dispatcher hands them to free workers.

A job is accepted `waiting`. A dispatch pass, in one transaction under one lock (so two dispatchers
never both fill the same free slot or take the same job), reads the teams' loads and the waiting
jobs, picks by fair share (service_core.fair_share) as many as there are free worker slots, and moves
them to `queued` (`dispatched_at` set, `sent_at` not). Only once that is committed are their messages
sent, each then marked `sent_at`. A dispatcher that dies between the commit and a send leaves a
queued job without `sent_at`; any later pass sends it again once `UNSENT_GRACE_SECONDS` have passed. A
message sent twice (the sender died after sending, before marking it) is harmless: the worker's
start_attempt takes a job only while it is `queued`, so the second delivery is dropped.

Free worker slots: job workers (readers of the `gpu` queue, one job at a time each) whose heartbeat
is recent, less the jobs already on workers. With no live worker, nothing is dispatched.

Everything here is within one deployment (the broker key prefix, recorded on jobs and worker beats),
so deployments sharing a database never send each other's jobs.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from service_core.fair_share import Forecast, TeamLoad, WaitingJob, forecast, plan_dispatch
from service_core.job_states import transition
from service_core.models import (DISPATCHED_STATES, HEARTBEAT_SECONDS, LIVE_AFTER_MISSED_BEATS, Job, JobState, Team,
                                 WorkerHeartbeat, utcnow)
from service_core.settings import GPU_QUEUE, Settings

log = logging.getLogger(__name__)

# A live dispatcher sends within milliseconds of its commit; a queued job unsent for longer lost its sender.
UNSENT_GRACE_SECONDS = 10.0
# What a job of a kind that never succeeded here is expected to take, until one has.
DEFAULT_EXPECTED_SECONDS = 60.0
# The recent successes of a kind its expected duration is the mean of.
RECENT_JOBS_PER_KIND = 20
# Any constant key: every dispatcher of a deployment takes the same transaction-scoped lock.
DISPATCH_LOCK_KEY = 0x70_6D_64_69_73_70  # "pmdisp"


def lock_dispatch(session: Session) -> None:
    """Serialise dispatch passes until this transaction ends (Postgres: an advisory lock; SQLite: its write lock,
    which the first write of a transaction takes)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DISPATCH_LOCK_KEY})
    else:
        session.execute(update(Team).where(text("1 = 0")).values(weight=Team.weight)
                        .execution_options(synchronize_session=False))


def live_job_workers(session: Session, deployment: str, now: datetime) -> int:
    """The deployment's job workers (readers of the gpu queue) that beat within the last few heartbeats: each runs
    one job at a time."""
    cutoff = now - timedelta(seconds=LIVE_AFTER_MISSED_BEATS * HEARTBEAT_SECONDS)
    queues = session.scalars(select(WorkerHeartbeat.queues).where(WorkerHeartbeat.beat_at >= cutoff,
                                                                  WorkerHeartbeat.deployment == deployment))
    return sum(GPU_QUEUE in names.split(",") for names in queues)


def expected_seconds(session: Session, kinds: Iterable[str]) -> dict[str, float]:
    """Each kind's expected duration: the mean of its last successes, from first start to end."""
    expected = {}
    for kind in set(kinds):
        runs = session.execute(select(Job.started_at, Job.finished_at).where(
            Job.kind == kind, Job.state == JobState.succeeded, Job.started_at.is_not(None))
            .order_by(Job.finished_at.desc()).limit(RECENT_JOBS_PER_KIND)).all()
        durations = [(finished - started).total_seconds() for started, finished in runs]
        expected[kind] = sum(durations) / len(durations) if durations else DEFAULT_EXPECTED_SECONDS
    return expected


@dataclass
class QueueSnapshot:
    teams: dict[uuid.UUID, TeamLoad]
    waiting: list[WaitingJob]
    in_flight: list[tuple[uuid.UUID, float]]  # each dispatched job's team and its expected seconds left
    worker_slots: int

    @property
    def free_slots(self) -> int:
        return self.worker_slots - len(self.in_flight)


def snapshot(session: Session, settings: Settings, deployment: str, now: datetime) -> QueueSnapshot:
    """The deployment's teams' loads (worker time used in the window, dispatched jobs charged at least their
    expected time), waiting jobs and live worker slots, as the dispatcher weighs them."""
    window_start = now - timedelta(seconds=settings.fair_share_window_seconds)
    waiting_rows = session.execute(select(Job.id, Job.team_id, Job.kind, Job.priority, Job.created_at)
                                   .where(Job.state == JobState.waiting, Job.deployment == deployment)).all()
    used_rows = session.execute(select(Job.team_id, Job.kind, Job.state, Job.started_at, Job.finished_at).where(
        Job.deployment == deployment,
        or_(Job.state.in_(DISPATCHED_STATES), and_(Job.finished_at >= window_start, Job.started_at.is_not(None))))).all()
    expected = expected_seconds(session, [row.kind for row in waiting_rows] + [row.kind for row in used_rows])

    used: dict[uuid.UUID, float] = defaultdict(float)
    running: dict[uuid.UUID, int] = defaultdict(int)
    in_flight = []
    for team_id, kind, state, started, finished in used_rows:
        if state in DISPATCHED_STATES:
            elapsed = (now - started).total_seconds() if started else 0.0
            used[team_id] += max(elapsed, expected[kind])
            running[team_id] += 1
            in_flight.append((team_id, max(expected[kind] - elapsed, 0.0)))
        elif started is not None and finished is not None:
            used[team_id] += max((finished - max(started, window_start)).total_seconds(), 0.0)

    team_ids = {row.team_id for row in waiting_rows} | set(running)
    teams = {}
    for team_id, weight, cap in session.execute(select(Team.id, Team.weight, Team.max_running_jobs)
                                                .where(Team.id.in_(team_ids))):
        teams[team_id] = TeamLoad(weight=weight, used_seconds=used[team_id], running=running[team_id],
                                  running_cap=settings.max_active_jobs_per_team if cap is None else cap)
    waiting = [WaitingJob(row.id, row.team_id, row.priority, row.created_at, expected[row.kind])
               for row in waiting_rows]
    return QueueSnapshot(teams, waiting, in_flight, live_job_workers(session, deployment, now))


def claim_waiting(session: Session, settings: Settings, now: datetime) -> list[uuid.UUID]:
    """Move the jobs fair share gives the free worker slots from `waiting` to `queued`; the caller commits,
    then sends them (send_dispatched). Holds the dispatch lock until the transaction ends."""
    lock_dispatch(session)
    state = snapshot(session, settings, settings.broker_key_prefix, now)
    claimed = []
    for job in plan_dispatch(state.teams, state.waiting, state.free_slots):
        # Conditional: a cancel may have ended it since the snapshot.
        if transition(session, job.id, [JobState.waiting], JobState.queued, dispatched_at=now, sent_at=None):
            claimed.append(job.id)
    return claimed


def claim_unsent(session: Session, deployment: str, now: datetime) -> list[uuid.UUID]:
    """Queued jobs whose message was never confirmed sent (their sender died, or the broker was away): claimed
    for sending again by moving their `dispatched_at` on, so another dispatcher leaves them alone meanwhile."""
    cutoff = now - timedelta(seconds=UNSENT_GRACE_SECONDS)
    return list(session.scalars(
        update(Job).where(Job.state == JobState.queued, Job.sent_at.is_(None), Job.deployment == deployment,
                          or_(Job.dispatched_at.is_(None), Job.dispatched_at < cutoff))
        .values(dispatched_at=now).returning(Job.id)))


def send_dispatched(sessions: sessionmaker[Session], send: Callable[[uuid.UUID], None],
                    job_ids: Iterable[uuid.UUID]) -> None:
    """Send each job's message to the broker, then mark it sent. A send that fails (the broker is away) stops
    the run: the unsent jobs stay queued without `sent_at`, and a later pass sends them."""
    for job_id in job_ids:
        send(job_id)
        with sessions() as session:
            session.execute(update(Job).where(Job.id == job_id).values(sent_at=utcnow())
                            .execution_options(synchronize_session=False))
            session.commit()


def dispatch_once(sessions: sessionmaker[Session], send: Callable[[uuid.UUID], None],
                  settings: Settings) -> list[uuid.UUID]:
    """One dispatch pass: waiting jobs to free workers by fair share, and unsent ones sent again; the jobs sent."""
    now = utcnow()
    with sessions() as session:
        claimed = claim_waiting(session, settings, now) + claim_unsent(session, settings.broker_key_prefix, now)
        session.commit()
    send_dispatched(sessions, send, claimed)
    return claimed


def forecast_waiting(session: Session, settings: Settings,
                     deployment: str) -> tuple[datetime, dict[uuid.UUID, Forecast], bool]:
    """The deployment's waiting jobs' queue positions and expected starts in seconds
    (service_core.fair_share.forecast), with the time they count from and whether any of its workers is live
    (without one, no start can be estimated).

    Positions are counted as if one worker were live when none is, so the order still shows."""
    now = utcnow()
    state = snapshot(session, settings, deployment, now)
    forecasts = forecast(state.teams, state.waiting, state.in_flight, max(state.worker_slots, 1))
    return now, forecasts, state.worker_slots > 0

