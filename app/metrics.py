"""`GET /metrics`: the service in Prometheus' text format, read from the database at each scrape.

Every figure is a query over the rows the API and the workers write (jobs, artifacts, worker
heartbeats), so any API process answers for the whole deployment, several API processes agree,
and a restart loses nothing. Mounted only with PIVOTMERGE_METRICS_ENABLED=true (docs/service.md).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Iterable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service_core.models import (FINAL_STATES, HEARTBEAT_SECONDS, LIVE_AFTER_MISSED_BEATS, Artifact, Job, JobState, Team,
                                 WorkerHeartbeat, utcnow)
from service_core.settings import GPU_QUEUE
from workers.celery_app import WEBHOOK_QUEUE

# Seconds: from a quick job on an idle pool to a 6-hour merge (the default time limit).
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200, 21600)
UNSTARTED_STATES = (JobState.waiting, JobState.queued)  # in a team's queue, or sent to a worker not yet started


def histogram(name: str, documentation: str, labels: list[str], buckets: tuple[float, ...],
              samples: dict[tuple[str, ...], list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, values in sorted(samples.items()):
        cumulative = [(str(float(bound)), sum(v <= bound for v in values)) for bound in buckets]
        family.add_metric(list(label_values), cumulative + [("+Inf", len(values))], sum_value=sum(values))
    return family


def seconds(start: datetime, end: datetime) -> float:
    return max((end - start).total_seconds(), 0.0)


class DatabaseCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], kinds: list[str]) -> None:
        self.sessions = sessions
        self.kinds = kinds  # the declared job kinds: each is listed, with zeros where it has no jobs

    def collect(self) -> Iterable[Metric]:
        with self.sessions() as session:
            yield from self._jobs(session)
            yield from self._timings(session)
            yield from self._workers(session)
            yield from self._bytes(session)

    def _jobs(self, session: Session) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("pivotmerge_jobs", "Jobs by state, kind and team.", labels=["state", "kind", "team"])
        finished = CounterMetricFamily("pivotmerge_jobs_finished", "Jobs that ended, by kind and final state.",
                                       labels=["kind", "state"])
        ended: dict[tuple[str, str], int] = defaultdict(int)
        rows = session.execute(select(Job.state, Job.kind, Team.name, func.count()).join(Team, Team.id == Job.team_id)
                               .group_by(Job.state, Job.kind, Team.name)).all()
        for state, kind, team, count in sorted(rows):
            jobs.add_metric([state.value, kind, team], count)
            if state in FINAL_STATES:
                ended[kind, state.value] += count
        for kind in self.kinds:
            for state in FINAL_STATES:
                finished.add_metric([kind, state.value], ended[kind, state.value])
        yield jobs
        yield finished

        depth = GaugeMetricFamily("pivotmerge_queue_depth", "Jobs waiting for a worker (waiting or queued), by kind.",
                                  labels=["kind"])
        oldest = GaugeMetricFamily("pivotmerge_queue_oldest_seconds",
                                   "Age of the oldest job waiting for a worker, by kind (0: none waits).", labels=["kind"])
        waiting = dict(((kind, (count, first)) for kind, count, first in session.execute(
            select(Job.kind, func.count(), func.min(Job.created_at)).where(Job.state.in_(UNSTARTED_STATES))
            .group_by(Job.kind))))
        now = utcnow()
        for kind in self.kinds:
            count, first = waiting.get(kind, (0, None))
            depth.add_metric([kind], count)
            oldest.add_metric([kind], seconds(first, now) if first else 0.0)
        yield depth
        yield oldest

        team_depth = GaugeMetricFamily("pivotmerge_team_queue_depth",
                                       "Jobs held in a team's queue for the dispatcher (state waiting), by team.",
                                       labels=["team"])
        for team, count in session.execute(select(Team.name, func.count()).join(Job, Job.team_id == Team.id)
                                           .where(Job.state == JobState.waiting).group_by(Team.name)):
            team_depth.add_metric([team], count)
        yield team_depth

    def _timings(self, session: Session) -> Iterator[Metric]:
        waits: dict[tuple[str, ...], list[float]] = defaultdict(list)
        durations: dict[tuple[str, ...], list[float]] = defaultdict(list)
        method = Job.spec["method"].as_string()
        for kind, method_name, created, started, finished in session.execute(
                select(Job.kind, method, Job.created_at, Job.started_at, Job.finished_at)
                .where(Job.started_at.is_not(None))):
            waits[(kind,)].append(seconds(created, started))
            if finished is not None:
                durations[(kind, method_name or "")].append(seconds(started, finished))
        yield histogram("pivotmerge_job_wait_seconds", "From submission to a worker's first start, by kind.",
                        ["kind"], WAIT_BUCKETS, waits)
        yield histogram("pivotmerge_job_duration_seconds",
                        "From a worker's first start to the end, of jobs that ended, by kind and method.",
                        ["kind", "method"], DURATION_BUCKETS, durations)

    def _workers(self, session: Session) -> Iterator[Metric]:
        beats = GaugeMetricFamily("pivotmerge_worker_heartbeat_timestamp_seconds",
                                  "Unix time of each job worker's last heartbeat.", labels=["worker", "queues"])
        live = GaugeMetricFamily("pivotmerge_workers_live",
                                 f"Job workers that beat within the last {LIVE_AFTER_MISSED_BEATS} heartbeats, "
                                 "by queue they read.", labels=["queue"])
        cutoff = utcnow() - timedelta(seconds=LIVE_AFTER_MISSED_BEATS * HEARTBEAT_SECONDS)
        live_by_queue = {GPU_QUEUE: 0, WEBHOOK_QUEUE: 0}
        for row in session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.name)):
            beats.add_metric([row.name, row.queues], row.beat_at.timestamp())
            for queue in filter(None, row.queues.split(",")):
                live_by_queue[queue] = live_by_queue.get(queue, 0) + (row.beat_at >= cutoff)
        for queue, count in sorted(live_by_queue.items()):
            live.add_metric([queue], count)
        yield beats
        yield live

    def _bytes(self, session: Session) -> Iterator[Metric]:
        merged = GaugeMetricFamily("pivotmerge_merged_bytes",
                                   "Bytes of succeeded merges' output in the artifact store, by team "
                                   "(deleted and expired jobs no longer count).", labels=["team"])
        for team, total in session.execute(
                select(Team.name, func.sum(Artifact.size)).join(Job, Job.id == Artifact.job_id)
                .join(Team, Team.id == Job.team_id)
                .where(Job.kind == "merge", Job.state == JobState.succeeded).group_by(Team.name)
                .order_by(Team.name)):
            merged.add_metric([team], float(total))
        yield merged


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app, sessions: sessionmaker[Session], kinds: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Mount `GET /metrics` on `app`, reading `sessions`' database, for the declared job `kinds`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions, kinds))
    app.state.metrics_registry = registry
    app.include_router(router)
