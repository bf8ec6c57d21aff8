"""Team queues against real servers: Postgres, Redis, `celery worker` processes and `pivotmerge serve --no-worker`
processes (the API, whose housekeeping runs the dispatcher).

Everything here runs in a database of its own, so the session's workers and dispatchers (in other tests'
stacks) neither count as this run's worker slots nor send its jobs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.auth import create_api_key, create_team
from app.cli import admin, free_port
from app.main import create_app
from fastapi.testclient import TestClient
from service_core.db import make_engine, make_sessionmaker
from service_core.models import Job, JobEvent, JobState, Team, WorkerHeartbeat, utcnow
from service_core.settings import Settings
from service_core.team_queues import DEFAULT_EXPECTED_SECONDS, UNSENT_GRACE_SECONDS, claim_waiting, dispatch_once
from tests.service.service_support import WorkerProcess, merge_spec, migrated_database, service_env, wait_for

JOBS_PER_TEAM = 40
WEIGHTS = {"a": 1.0, "b": 1.0, "c": 2.0}
SHARE_TOLERANCE = 0.10  # of each team's weight share


@pytest.fixture(scope="module")
def queue_db(pg_admin_url: str) -> Iterator[str]:
    with migrated_database(pg_admin_url, "pivotmerge_test_queues_") as url:
        yield url


@pytest.fixture(scope="module")
def queue_sessions(queue_db: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(queue_db)
    yield make_sessionmaker(engine)
    engine.dispose()


def queue_values(settings_values: dict[str, str], queue_db: str, deployment: str) -> dict[str, str]:
    return {**settings_values, "database_url": queue_db,
            "broker_key_prefix": settings_values["broker_key_prefix"].replace(":", f"-{deployment}:")}


def new_team(sessions: sessionmaker[Session], name: str) -> tuple[str, dict[str, str]]:
    with sessions() as session:
        team = create_team(session, f"{name}-{uuid.uuid4().hex[:8]}")
        _, key = create_api_key(session, team)
        session.commit()
        return team.name, {"Authorization": f"Bearer {key}"}


def live_worker(sessions: sessionmaker[Session], deployment: str) -> None:
    """A job worker's beat as its main process writes it (workers.heartbeat): a free slot for the dispatcher."""
    with sessions() as session:
        session.add(WorkerHeartbeat(name=f"w-{uuid.uuid4().hex[:6]}@host", queues="gpu,webhooks", pid=1,
                                    deployment=deployment))
        session.commit()


def waiting_jobs(sessions: sessionmaker[Session], deployment: str, count: int) -> list[uuid.UUID]:
    with sessions() as session:
        team = create_team(session, f"rows-{uuid.uuid4().hex[:8]}")
        session.flush()
        jobs = [Job(team_id=team.id, kind="merge", spec={}, request_sha256="-", deployment=deployment)
                for _ in range(count)]
        session.add_all(jobs)
        session.commit()
        return [job.id for job in jobs]


def test_concurrent_dispatchers_fill_each_free_slot_once(queue_sessions, queue_db, settings_values) -> None:
    """Eight dispatch passes at once over 3 free slots: 3 jobs sent, each once (the advisory lock serialises the
    passes; each sees the slots the others filled)."""
    settings = Settings(**queue_values(settings_values, queue_db, "race"))
    jobs = waiting_jobs(queue_sessions, settings.broker_key_prefix, 10)
    for _ in range(3):
        live_worker(queue_sessions, settings.broker_key_prefix)
    sent: list[uuid.UUID] = []
    start = threading.Barrier(8)

    def one_pass() -> None:
        start.wait()
        dispatch_once(queue_sessions, sent.append, settings)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: one_pass(), range(8)))
    assert len(sent) == len(set(sent)) == 3
    with queue_sessions() as session:
        queued = session.scalars(select(Job.id).where(Job.id.in_(jobs), Job.state == JobState.queued,
                                                      Job.sent_at.is_not(None))).all()
    assert sorted(queued) == sorted(sent)


def test_a_job_dispatched_by_a_dispatcher_that_died_before_sending_is_sent_again(queue_sessions, queue_db,
                                                                                 settings_values) -> None:
    settings = Settings(**queue_values(settings_values, queue_db, "crash"))
    [job_id] = waiting_jobs(queue_sessions, settings.broker_key_prefix, 1)
    live_worker(queue_sessions, settings.broker_key_prefix)
    with queue_sessions() as session:  # a dispatcher's pass, committed; then it died before sending
        assert claim_waiting(session, settings, utcnow()) == [job_id]
        session.commit()
    sent: list[uuid.UUID] = []
    assert dispatch_once(queue_sessions, sent.append, settings) == []  # its sender may still be at it
    with queue_sessions() as session:  # the grace has passed
        session.execute(update(Job).where(Job.id == job_id).values(
            dispatched_at=utcnow() - timedelta(seconds=UNSENT_GRACE_SECONDS + 1)))
        session.commit()
    assert dispatch_once(queue_sessions, sent.append, settings) == [job_id] and sent == [job_id]
    assert dispatch_once(queue_sessions, sent.append, settings) == []  # sent: once only
    with queue_sessions() as session:
        job = session.get(Job, job_id)
        assert job.state is JobState.queued and job.sent_at is not None


def test_waiting_jobs_show_their_position_and_estimated_start(queue_sessions, queue_db, settings_values,
                                                              tiny) -> None:
    # No dispatcher in this API (housekeeping off) and no worker yet: everything waits.
    settings = Settings(**{**queue_values(settings_values, queue_db, "positions"), "housekeeping": "false"})
    _, a = new_team(queue_sessions, "a")
    _, b = new_team(queue_sessions, "b")
    with TestClient(create_app(settings)) as client:
        def submit(team: dict[str, str], priority: int = 0) -> str:
            response = client.post("/v1/merges", params={"priority": priority}, json=merge_spec(tiny), headers=team)
            assert response.status_code == 202, response.text
            assert response.json()["state"] == "waiting" and response.json()["priority"] == priority
            return response.json()["id"]

        a1, a_urgent, a3, b1, b2 = submit(a), submit(a, 5), submit(a), submit(b), submit(b)
        # Weights 1:1, nothing used, each job charged the default 60 s. A's head is its priority 5 job, older than
        # B's head: it goes first (A at 60, B at 0); B1 (both at 60); A1 (older head than B2); B2; A3.
        order = [a_urgent, b1, a1, b2, a3]
        for team, mine in ((a, {a1, a_urgent, a3}), (b, {b1, b2})):
            for job in client.get("/v1/merges", headers=team).json()["jobs"]:
                assert job["queue_position"] == order.index(job["id"]) + 1 and job["estimated_start"] is None
                assert job["id"] in mine
        live_worker(queue_sessions, settings.broker_key_prefix)  # one slot: each starts 60 s after the one before
        starts = [datetime.fromisoformat(client.get(f"/v1/merges/{job_id}", headers=a if job_id in (a1, a_urgent, a3)
                                                    else b).json()["estimated_start"]) for job_id in order]
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(starts, starts[1:])]
        assert all(abs(gap - DEFAULT_EXPECTED_SECONDS) < 1 for gap in gaps), gaps
        assert abs((starts[0] - utcnow()).total_seconds()) < 5

        cancelled = client.post(f"/v1/merges/{a_urgent}:cancel", headers=a).json()
        assert cancelled["state"] == "cancelled" and cancelled["queue_position"] is None
        # Both teams at 0 again: A1's head is older than B1.
        assert [client.get(f"/v1/merges/{job_id}", headers=team).json()["queue_position"]
                for job_id, team in ((a1, a), (b1, b), (a3, a), (b2, b))] == [1, 2, 3, 4]

        for bad in ("1001", "-1001", "high", "1.5", "nan", "inf", "1e400", "9" * 400, "1\x00"):
            refused = client.post("/v1/merges", params={"priority": bad}, json=merge_spec(tiny), headers=a)
            assert refused.status_code == 422 and refused.json()["field"] == "priority", refused.text


def test_set_team_sets_weight_and_running_cap(queue_sessions, queue_db) -> None:
    name, _ = new_team(queue_sessions, "admin")
    runner, env = CliRunner(), {"PIVOTMERGE_DATABASE_URL": queue_db}
    done = runner.invoke(admin, ["set-team", name, "--weight", "2.5", "--max-running", "0"], env=env)
    assert done.exit_code == 0 and done.output == f"team {name}: weight 2.5, running cap 0\n", done.output
    assert f"{name}  " in runner.invoke(admin, ["list-teams"], env=env).output
    back = runner.invoke(admin, ["set-team", name, "--default-max-running"], env=env)
    assert back.output == f"team {name}: weight 2.5, running cap the default\n"
    for wrong in (["--weight", "0"], ["--weight", "-1"], ["--weight", "nan"], ["--weight", "inf"], ["--weight", "1e9"],
                  ["--max-running", "-1"], []):
        refused = runner.invoke(admin, ["set-team", name, *wrong], env=env)
        assert refused.exit_code == 2 and "Traceback" not in refused.output, (wrong, refused.output)
    assert "nan is not a weight" in runner.invoke(admin, ["set-team", name, "--weight", "nan"], env=env).output
    for unknown, message in (("no-such-team", "no team named 'no-such-team'"),
                             ("lab\x00", "team name: 'lab\\x00' is not printable UTF-8 text")):
        missing = runner.invoke(admin, ["set-team", unknown, "--weight", "2"], env=env)
        lines = missing.output.splitlines()
        # exit 1 from the admin group itself; the `pivotmerge` command turns a ClickException into exit 2
        assert missing.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {message}"), missing.output
    with queue_sessions() as session:
        assert session.scalar(select(Team.weight).where(Team.name == name)) == 2.5  # nothing refused was written


class ApiProcess:
    """`pivotmerge serve --no-worker`: the API and its housekeeping (the dispatcher), as a deployment runs it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "serve", "--no-worker",
                   "--port", self.url.rsplit(":", 1)[1]]
        self.process = subprocess.Popen(command, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
        wait_for(self.ready, 60, "the API to start", 0.2)

    def ready(self) -> bool:
        assert self.process.poll() is None, "the API exited"
        try:
            return httpx.get(f"{self.url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@dataclass
class JobRow:
    team: str
    state: JobState
    attempts: int
    created_at: datetime
    dispatched_at: datetime
    started_at: datetime
    finished_at: datetime
    dispatches: int  # `queued` state events: times the job was handed to a worker
    starts: int  # `running` state events


@dataclass
class FairRun:
    jobs: dict[uuid.UUID, JobRow]
    fourth: uuid.UUID  # team d's single job, submitted mid-run
    waiting_at_kill: int
    seconds: float


def job_rows(sessions: sessionmaker[Session], names: dict[str, str]) -> dict[uuid.UUID, JobRow]:
    teams = {v: k for k, v in names.items()}
    with sessions() as session:
        events = dict(session.execute(
            select(JobEvent.job_id, func.count()).where(JobEvent.type == "state", JobEvent.data["state"].as_string()
                                                        == "queued").group_by(JobEvent.job_id)).all())
        starts = dict(session.execute(
            select(JobEvent.job_id, func.count()).where(JobEvent.type == "state", JobEvent.data["state"].as_string()
                                                        == "running").group_by(JobEvent.job_id)).all())
        rows = session.execute(select(Job, Team.name).join(Team, Team.id == Job.team_id)
                               .where(Team.name.in_(teams))).all()
        return {job.id: JobRow(teams[name], job.state, job.attempts, job.created_at, job.dispatched_at,
                               job.started_at, job.finished_at, events.get(job.id, 0), starts.get(job.id, 0))
                for job, name in rows}


@pytest.fixture(scope="module")
def fair_run(queue_sessions, queue_db, settings_values, tiny, service_dir) -> Iterator[FairRun]:  # type: ignore[no-untyped-def]
    """Teams a, b, c (weights 1:1:2) submit 40 merges each, interleaved, before 2 workers start; once 30 jobs
    have ended team d submits one; once 60 have ended the API (and its dispatcher, ticking every 50 ms) is
    SIGKILLed and another started. Every job has ended when it yields."""
    began = utcnow()
    env = service_env({**queue_values(settings_values, queue_db, "fair"), "dispatch_seconds": "0.05"})
    names, headers = {}, {}
    for team in (*WEIGHTS, "d"):
        names[team], headers[team] = new_team(queue_sessions, team)
        weight = WEIGHTS.get(team, 1.0)
        done = CliRunner().invoke(admin, ["set-team", names[team], "--weight", str(weight)],
                                  env={"PIVOTMERGE_DATABASE_URL": queue_db})
        assert done.exit_code == 0, done.output
    log = service_dir / "fair-api.log"
    api = ApiProcess(env, log)
    workers: list[WorkerProcess] = []
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for _ in range(JOBS_PER_TEAM):
                for team in WEIGHTS:
                    assert http.post("/v1/merges", json=merge_spec(tiny), headers=headers[team]).status_code == 202
        with ThreadPoolExecutor(2) as pool:
            workers = list(pool.map(lambda i: WorkerProcess(env, service_dir / f"fair-{i}.log", f"pmtest-fair{i}"),
                                    range(2)))

        def ended() -> int:
            with queue_sessions() as session:
                return session.scalar(select(func.count()).select_from(Job).join(Team, Team.id == Job.team_id)
                                      .where(Team.name.in_(names.values()), Job.state == JobState.succeeded))

        wait_for(lambda: ended() >= 30, 120, "30 jobs to end", 0.05)
        with httpx.Client(base_url=api.url, timeout=30) as http:
            fourth = uuid.UUID(http.post("/v1/merges", json=merge_spec(tiny), headers=headers["d"]).json()["id"])
        wait_for(lambda: ended() >= 60, 120, "60 jobs to end", 0.05)
        api.kill()
        with queue_sessions() as session:
            waiting_at_kill = session.scalar(select(func.count()).where(Job.state == JobState.waiting,
                                                                        Job.deployment == env["PIVOTMERGE_BROKER_KEY_PREFIX"]))
        api = ApiProcess(env, log)
        wait_for(lambda: ended() == 3 * JOBS_PER_TEAM + 1, 180, "every job to end", 0.2)
        yield FairRun(job_rows(queue_sessions, names), fourth, waiting_at_kill, (utcnow() - began).total_seconds())
    finally:
        for worker in workers:
            worker.stop()
        api.stop()


def overlap(start: datetime, end: datetime, period: tuple[datetime, datetime]) -> float:
    return max((min(end, period[1]) - max(start, period[0])).total_seconds(), 0.0)


@pytest.mark.slow
def test_teams_share_the_workers_by_weight_while_all_wait(fair_run: FairRun) -> None:
    jobs = [row for row in fair_run.jobs.values() if row.team in WEIGHTS]
    # The busy period: from the first start until the first team's last job left the queue.
    period = (min(row.started_at for row in jobs),
              min(max(row.dispatched_at for row in jobs if row.team == team) for team in WEIGHTS))
    used = {team: sum(overlap(row.started_at, row.finished_at, period) for row in jobs if row.team == team)
            for team in WEIGHTS}
    shares = {team: used[team] / sum(used.values()) for team in WEIGHTS}
    print(f"busy period {(period[1] - period[0]).total_seconds():.1f} s, worker-seconds {used}, shares {shares}, "
          f"whole run {fair_run.seconds:.1f} s")
    for team, weight in WEIGHTS.items():
        target = weight / sum(WEIGHTS.values())
        assert abs(shares[team] - target) <= SHARE_TOLERANCE * target, (team, shares)


@pytest.mark.slow
def test_a_fourth_teams_job_starts_within_about_one_jobs_time(fair_run: FairRun) -> None:
    fourth = fair_run.jobs[fair_run.fourth]
    durations = sorted((row.finished_at - row.started_at).total_seconds() for row in fair_run.jobs.values())
    waited = (fourth.started_at - fourth.created_at).total_seconds()
    print(f"team d's job waited {waited:.2f} s; job durations: median {durations[len(durations) // 2]:.2f} s, "
          f"longest {durations[-1]:.2f} s")
    assert waited <= durations[-1] + 0.5


@pytest.mark.slow
def test_killing_the_dispatcher_mid_run_loses_and_duplicates_nothing(fair_run: FairRun) -> None:
    assert fair_run.waiting_at_kill > 0  # the kill came while the queue still held work
    assert len(fair_run.jobs) == 3 * JOBS_PER_TEAM + 1
    wrong = {job_id: row for job_id, row in fair_run.jobs.items()
             if (row.state, row.attempts, row.dispatches, row.starts) != (JobState.succeeded, 1, 1, 1)}
    assert not wrong

