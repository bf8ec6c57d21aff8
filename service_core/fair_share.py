"""Weighted fair share across teams: which waiting job a free worker slot goes to. Pure: no database, no clock.

Each team has a virtual time, the worker-seconds it used within the fair-share window divided by its
weight. A free slot goes to the team with the least virtual time among those with a waiting job and
room under their running cap; within that team, to its highest-priority job, the oldest first. A
dispatched job is charged its expected duration at once (stride scheduling's pass += stride), so the
slots of one pass, and a job that has only just started, already count against its team. No team
starves: every dispatch raises the virtual time of the team that got it, until a waiting team's is
the least.
"""

from __future__ import annotations

import heapq
import uuid
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Iterable, Mapping, NamedTuple


@dataclass(frozen=True)
class TeamLoad:
    weight: float  # > 0
    used_seconds: float  # worker-seconds charged to the team within the window, its dispatched jobs included
    running: int  # its jobs on workers: queued, running or cancelling
    running_cap: int  # at most this many on workers at once; 0 holds every job of the team

    @property
    def virtual_time(self) -> float:
        return self.used_seconds / self.weight


@dataclass(frozen=True)
class WaitingJob:
    id: uuid.UUID
    team_id: uuid.UUID
    priority: int  # higher first, within its team only
    created_at: datetime
    expected_seconds: float  # what it is charged when dispatched: its kind's recent mean duration


def order_in_team(job: WaitingJob) -> tuple[int, datetime, uuid.UUID]:
    return -job.priority, job.created_at, job.id


class FairQueue:
    """Teams' loads and their waiting jobs, as a run of picks leaves them (the arguments are not changed)."""

    def __init__(self, teams: Mapping[uuid.UUID, TeamLoad], waiting: Iterable[WaitingJob]) -> None:
        self.teams = dict(teams)
        by_team: dict[uuid.UUID, list[WaitingJob]] = {}
        for job in waiting:
            if job.team_id in self.teams:
                by_team.setdefault(job.team_id, []).append(job)
        self.queues = {team: deque(sorted(jobs, key=order_in_team)) for team, jobs in by_team.items()}

    def pick(self) -> WaitingJob | None:
        """The job the next free slot goes to, or None when no team with waiting jobs is under its cap.

        Ties of virtual time go to the team whose next job was submitted first.
        """
        heads = [queue[0] for team, queue in self.queues.items()
                 if queue and self.teams[team].running < self.teams[team].running_cap]
        return min(heads, key=lambda job: (self.teams[job.team_id].virtual_time, job.created_at, job.id), default=None)

    def dispatch(self, job: WaitingJob) -> None:
        """`job` (the head of its team's queue) goes to a worker: its team is charged and has one more running."""
        self.queues[job.team_id].popleft()
        load = self.teams[job.team_id]
        self.teams[job.team_id] = replace(load, used_seconds=load.used_seconds + job.expected_seconds,
                                          running=load.running + 1)

    def finish(self, team_id: uuid.UUID) -> None:
        """One of the team's jobs left its worker (its charge stays: it was used)."""
        if (load := self.teams.get(team_id)) is not None:
            self.teams[team_id] = replace(load, running=load.running - 1)


def pick_next(teams: Mapping[uuid.UUID, TeamLoad], waiting: Iterable[WaitingJob]) -> WaitingJob | None:
    """The waiting job a free worker slot goes to now (None: no team may start one)."""
    return FairQueue(teams, waiting).pick()


def plan_dispatch(teams: Mapping[uuid.UUID, TeamLoad], waiting: Iterable[WaitingJob],
                  free_slots: int) -> list[WaitingJob]:
    """The jobs to hand to `free_slots` free workers now, in order, each pick charged before the next."""
    queue = FairQueue(teams, waiting)
    chosen: list[WaitingJob] = []
    while len(chosen) < free_slots and (job := queue.pick()) is not None:
        queue.dispatch(job)
        chosen.append(job)
    return chosen


class Forecast(NamedTuple):
    position: int  # 1: the next job any worker starts
    start_in_seconds: float  # from now


def forecast(teams: Mapping[uuid.UUID, TeamLoad], waiting: Iterable[WaitingJob],
             in_flight: Iterable[tuple[uuid.UUID, float]], worker_slots: int) -> dict[uuid.UUID, Forecast]:
    """When each waiting job would start if every job took its expected time and nothing else were submitted.

    `in_flight`: each dispatched job's team and the seconds it is expected to hold its worker still. The
    dispatcher is replayed: whenever a slot is free the fair-share pick takes it, else the time moves on to
    the next expected end. A job that cannot start (its team's cap is 0, or there is no worker) is left out.
    """
    queue = FairQueue(teams, waiting)
    ends = [(seconds_left, str(team), team) for team, seconds_left in in_flight]
    heapq.heapify(ends)
    free = worker_slots - len(ends)
    now = 0.0
    forecasts: dict[uuid.UUID, Forecast] = {}
    while True:
        job = queue.pick() if free > 0 else None
        if job is not None:
            queue.dispatch(job)
            forecasts[job.id] = Forecast(len(forecasts) + 1, now)
            heapq.heappush(ends, (now + job.expected_seconds, str(job.team_id), job.team_id))
            free -= 1
        elif ends:
            now, _, team = heapq.heappop(ends)
            queue.finish(team)
            free += 1
        else:
            return forecasts
