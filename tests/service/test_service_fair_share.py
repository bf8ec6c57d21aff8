"""The fair-share pick (service_core.fair_share) on hand-computed cases: pure functions, no servers."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from service_core.fair_share import Forecast, TeamLoad, WaitingJob, forecast, pick_next, plan_dispatch

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def job(name: int, team: uuid.UUID, created_s: float, priority: int = 0, expected: float = 10.0) -> WaitingJob:
    return WaitingJob(uuid.UUID(int=100 + name), team, priority, T0 + timedelta(seconds=created_s), expected)


def load(weight: float = 1.0, used: float = 0.0, running: int = 0, cap: int = 4) -> TeamLoad:
    return TeamLoad(weight=weight, used_seconds=used, running=running, running_cap=cap)


def test_the_team_with_the_least_used_time_per_weight_goes_first() -> None:
    # A: 100 s / 1 = 100; B: 150 s / 2 = 75 -> B, though it used more and its job is younger.
    a1, b1 = job(1, A, 0), job(2, B, 5)
    assert pick_next({A: load(used=100), B: load(weight=2, used=150)}, [a1, b1]) == b1


def test_a_team_at_its_running_cap_is_passed_over() -> None:
    a1, b1 = job(1, A, 0), job(2, B, 5)
    assert pick_next({A: load(used=100), B: load(weight=2, used=150, running=2, cap=2)}, [a1, b1]) == a1
    assert pick_next({A: load(cap=0), B: load(running=1, cap=1)}, [a1, b1]) is None  # nobody may start one


def test_within_a_team_higher_priority_first_then_the_oldest() -> None:
    old, urgent, older_urgent = job(1, A, 0), job(2, A, 10, priority=5), job(3, A, 20, priority=5)
    assert plan_dispatch({A: load()}, [old, urgent, older_urgent], 3) == [urgent, older_urgent, old]


def test_priority_does_not_jump_other_teams() -> None:
    # A's urgent job waits while A's virtual time (20) exceeds B's (10).
    a_urgent, b1 = job(1, A, 0, priority=1000), job(2, B, 5, priority=-1000)
    assert pick_next({A: load(used=20), B: load(used=10)}, [a_urgent, b1]) == b1


def test_equal_virtual_times_go_to_the_oldest_head() -> None:
    a1, b1 = job(1, A, 3), job(2, B, 1)
    assert pick_next({A: load(), B: load(weight=3)}, [a1, b1]) == b1


def test_each_pick_is_charged_before_the_next() -> None:
    # Weights 1:1:2, nothing used, 10 s each. Pick 1: all at 0, A's head is oldest -> A (10). Pick 2: B (0) and
    # C (0) tie, B's head older -> B (10). Pick 3: C (0) -> C (10 / 2 = 5). Pick 4: C (5) < A, B (10) -> C (10).
    a = [job(n, A, n) for n in (0, 3)]
    b = [job(n, B, n) for n in (1, 4)]
    c = [job(n, C, n) for n in (2, 5, 6)]
    chosen = plan_dispatch({A: load(), B: load(), C: load(weight=2)}, a + b + c, 4)
    assert chosen == [a[0], b[0], c[0], c[1]]


def test_a_light_team_with_used_time_is_not_starved() -> None:
    # A weight 4 gains 2.5 of virtual time a job; B (weight 1) stands at 21. A takes picks while its virtual
    # time is below 21: at 0, 2.5, ..., 20 (9 picks, ending at 22.5); the 10th is B's.
    a = [job(n, A, n) for n in range(20)]
    b1 = job(50, B, 0.5)
    chosen = plan_dispatch({A: load(weight=4, cap=20), B: load(used=21)}, a + [b1], 10)
    assert chosen == a[:9] + [b1]


def test_plan_stops_at_the_free_slots_and_the_caps() -> None:
    a = [job(n, A, n) for n in range(5)]
    assert plan_dispatch({A: load(running=1, cap=3)}, a, 10) == a[:2]  # cap 3, one running already
    assert plan_dispatch({A: load()}, a, 0) == []
    assert plan_dispatch({A: load()}, [job(9, B, 0)], 1) == []  # a team without a load is nobody's


def test_forecast_replays_the_dispatcher_over_one_worker() -> None:
    # One worker, free; A (two jobs) and B (one), 10 s each: A1 at 0 (oldest head), then B1 (A at 10, B at 0)
    # at 10, then A2 at 20.
    a1, a2, b1 = job(1, A, 0), job(2, A, 1), job(3, B, 2)
    assert forecast({A: load(), B: load()}, [a1, a2, b1], [], 1) == {
        a1.id: Forecast(1, 0.0), b1.id: Forecast(2, 10.0), a2.id: Forecast(3, 20.0)}


def test_forecast_waits_for_running_jobs_and_caps() -> None:
    # The worker holds A's job for 5 s more (A charged 10): B1 (virtual time 0) starts at 5, ends at 15; then A2.
    a2, b1 = job(2, A, 0), job(3, B, 1)
    assert forecast({A: load(used=10, running=1), B: load()}, [a2, b1], [(A, 5.0)], 1) == {
        b1.id: Forecast(1, 5.0), a2.id: Forecast(2, 15.0)}
    # Two free workers but A's cap is 1: A2 starts when A1 ends, at 10, not at 0 beside it.
    a1 = job(1, A, 0)
    assert forecast({A: load(cap=1)}, [a1, a2], [], 2) == {a1.id: Forecast(1, 0.0), a2.id: Forecast(2, 10.0)}


def test_forecast_leaves_out_what_cannot_start() -> None:
    held, free = job(1, A, 0), job(2, B, 1)
    assert forecast({A: load(cap=0), B: load()}, [held, free], [], 1) == {free.id: Forecast(1, 0.0)}
    assert forecast({B: load()}, [free], [], 0) == {}  # no worker
