"""`GET /metrics` against a run with a real worker: every figure equals the rows in Postgres."""

from __future__ import annotations

import time
import uuid
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from app.auth import create_api_key, create_team
from app.main import create_app
from service_core.models import FINAL_STATES, Artifact, Job, JobState, Team, WorkerHeartbeat
from workers.kinds import load_kinds
from service_core.settings import Settings
from tests.service.service_support import merge_spec, wait_for

Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture(scope="module")
def monitored(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"metrics_enabled": True}))) as client:
        yield client


def scrape(client: TestClient) -> dict[Sample, float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def from_the_database(sessions, team: str) -> dict[Sample, float]:  # type: ignore[no-untyped-def]
    """What /metrics must say, counted here from the rows: the team's jobs, the queue, the histograms'
    counts and sums, the worker beats and the merged bytes."""
    expected: dict[Sample, float] = {}
    with sessions() as session:
        for state, kind, count in session.execute(
                select(Job.state, Job.kind, func.count()).join(Team, Team.id == Job.team_id)
                .where(Team.name == team).group_by(Job.state, Job.kind)):
            expected["pivotmerge_jobs", (("kind", kind), ("state", state.value), ("team", team))] = count
        for kind in [k.name for k in load_kinds()]:
            unstarted = session.scalar(select(func.count()).where(
                Job.state.in_([JobState.waiting, JobState.queued]), Job.kind == kind))
            expected["pivotmerge_queue_depth", (("kind", kind),)] = unstarted
            for state in FINAL_STATES:
                ended = session.scalar(select(func.count()).where(Job.state == state, Job.kind == kind))
                expected["pivotmerge_jobs_finished_total", (("kind", kind), ("state", state.value))] = ended
        rows = session.execute(select(Job.kind, Job.spec, Job.created_at, Job.started_at, Job.finished_at)
                               .where(Job.started_at.is_not(None))).all()
        waits: dict[str, list[float]] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        for kind, spec, created, started, finished in rows:
            # Never negative, as on /metrics: another test backdates finished_at (retention) past started_at.
            waits.setdefault(kind, []).append(max((started - created).total_seconds(), 0.0))
            if finished is not None:
                durations.setdefault((kind, spec.get("method") or ""), []).append(
                    max((finished - started).total_seconds(), 0.0))
        for kind, values in waits.items():
            expected["pivotmerge_job_wait_seconds_count", (("kind", kind),)] = len(values)
            expected["pivotmerge_job_wait_seconds_sum", (("kind", kind),)] = round(sum(values), 3)
        for (kind, method), values in durations.items():
            labels = (("kind", kind), ("method", method))
            expected["pivotmerge_job_duration_seconds_count", labels] = len(values)
            expected["pivotmerge_job_duration_seconds_sum", labels] = round(sum(values), 3)
        for beat in session.scalars(select(WorkerHeartbeat)):
            expected["pivotmerge_worker_heartbeat_timestamp_seconds",
                     (("queues", beat.queues), ("worker", beat.name))] = beat.beat_at.timestamp()
        waiting = session.scalar(select(func.count()).select_from(Job).join(Team, Team.id == Job.team_id)
                                 .where(Team.name == team, Job.state == JobState.waiting))
        if waiting:
            expected["pivotmerge_team_queue_depth", (("team", team),)] = waiting
        merged = session.scalar(select(func.sum(Artifact.size)).join(Job, Job.id == Artifact.job_id)
                                .join(Team, Team.id == Job.team_id)
                                .where(Team.name == team, Job.kind == "merge", Job.state == JobState.succeeded))
        if merged:
            expected["pivotmerge_merged_bytes", (("team", team),)] = merged
    return expected


def agrees(scraped: dict[Sample, float], expected: dict[Sample, float]) -> bool:
    """Every expected figure is on /metrics with that value (sums of seconds to the millisecond)."""
    def value(sample: Sample) -> float | None:
        found = scraped.get(sample)
        return None if found is None else round(found, 3) if sample[0].endswith("_sum") else found

    wrong = {sample: (value(sample), want) for sample, want in expected.items() if value(sample) != want}
    assert not wrong or len(wrong) < len(expected), wrong  # not a near miss in shape: the same names and labels
    return not wrong


def consistent(client: TestClient, sessions, team: str) -> bool:  # type: ignore[no-untyped-def]
    """One scrape between two identical readings of the database (jobs move while a worker runs)."""
    before = from_the_database(sessions, team)
    scraped = scrape(client)
    after = from_the_database(sessions, team)
    return before == after and agrees(scraped, before)


def test_metrics_are_off_unless_enabled(client) -> None:
    assert client.get("/metrics").status_code == 404


def test_metrics_equal_the_database_during_a_run_with_a_real_worker(monitored, queue_only_client, sessions, tiny,
                                                                   worker) -> None:
    with sessions() as session:
        team_row = create_team(session, f"metrics-{uuid.uuid4().hex[:8]}")
        _, key = create_api_key(session, team_row)
        session.commit()
    team, headers = team_row.name, {"Authorization": f"Bearer {key}"}
    waiting = [queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=headers).json()["id"]
               for _ in range(2)]  # waiting for good: no dispatcher sends them
    # Nine merges keep the worker busy for several scrapes even when the machine is quiet (three finished
    # before the first consistent scrape in a full-suite run).
    running = [monitored.post("/v1/merges", json=merge_spec(tiny, method=method), headers=headers).json()["id"]
               for method in ("task_arithmetic", "ties", "linear") * 3]

    def finished() -> bool:
        with sessions() as session:
            return all(session.get(Job, uuid.UUID(j)).state in FINAL_STATES for j in running)

    checked_mid_run = 0
    deadline = time.monotonic() + 120
    while not finished():
        assert time.monotonic() < deadline, "the jobs did not finish"
        checked_mid_run += consistent(monitored, sessions, team)
    assert checked_mid_run > 0  # at least one scrape while the worker was busy matched the rows
    wait_for(lambda: consistent(monitored, sessions, team), 30, "a scrape equal to the database")

    scraped = scrape(monitored)
    assert scraped["pivotmerge_jobs", (("kind", "merge"), ("state", "succeeded"), ("team", team))] == len(running)
    assert scraped["pivotmerge_jobs", (("kind", "merge"), ("state", "waiting"), ("team", team))] == len(waiting)
    assert scraped["pivotmerge_team_queue_depth", (("team", team),)] == len(waiting)
    assert scraped["pivotmerge_merged_bytes", (("team", team),)] > 0
    assert scraped["pivotmerge_workers_live", (("queue", "gpu"),)] >= 1  # the session's worker beats
    assert scraped["pivotmerge_queue_oldest_seconds", (("kind", "merge"),)] > 0
