"""A study: Optuna proposes trials (TPE; the whole grid when the space is discrete and small), a
`TrialRunner` scores each on the dev sets, and the best trial's merge is written as a normal merge
output whose report also holds the study.

Selection is honest: only dev scores choose; test sets are scored once, for the chosen trial, by
the merge itself (its report's ``evaluation``), and never feed back into the choice.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from pivotmerge.errors import MergeCancelled, PivotMergeError, SpecError
from pivotmerge.methods import get_method
from pivotmerge.methods.description import SearchRange
from pivotmerge.progress import CancelFn
from pivotmerge.report.study import CandidateReport, StudyReport, TrialRecord, best_of
from pivotmerge.spec.schema import MergeSpec
from pivotmerge.tune.space import Candidate, Space, params_of
from pivotmerge.tune.trials import DIRECTION, Objective, TrialRunner, objective_value, trial_spec

TrialFn = Callable[[TrialRecord], None]
StartFn = Callable[[int], None]  # called with the number of trials the study will run, at most


def _suggest(trial: optuna.Trial, key: str, search: Any) -> Any:
    if search.choices is not None:
        return trial.suggest_categorical(key, list(search.choices))
    if isinstance(search.low, int) and isinstance(search.high, int) and not isinstance(search.low, bool):
        return trial.suggest_int(key, search.low, search.high, log=search.log)
    return trial.suggest_float(key, float(search.low), float(search.high), log=search.log)


def _propose(trial: optuna.Trial, space: Space) -> tuple[Candidate, dict[str, Any]]:
    labels = [c.label for c in space.candidates]
    label = trial.suggest_categorical("candidate", labels) if len(labels) > 1 else labels[0]
    candidate = space.by_label(str(label))
    return candidate, {name: _suggest(trial, candidate.key(name), s) for name, s in candidate.searched.items()}


def _enqueue(study: optuna.Study, space: Space, label: str, values: Mapping[str, Any]) -> None:
    candidate = space.by_label(label)
    params = {candidate.key(k): v for k, v in values.items()}
    if len(space.candidates) > 1:
        params["candidate"] = label
    study.enqueue_trial(params, skip_if_exists=False)


def candidates_report(space: Space) -> dict[str, CandidateReport]:
    return {c.label: CandidateReport(method=c.method.name, fixed=c.fixed,
                                     searched={n: SearchRange.of(s) for n, s in c.searched.items()})
            for c in space.candidates}


@dataclass(frozen=True)
class Proposal:
    """A trial to run: what a worker needs besides its `TrialRunner`."""

    number: int
    label: str
    method: str
    params: dict[str, Any]


# Runs a batch of proposals (in this process, or fanned out to workers) and returns one record each.
BatchFn = Callable[[Sequence[Proposal]], list[TrialRecord]]


def local_batches(runner: TrialRunner) -> BatchFn:
    """Run each proposal in this process, one after the other."""
    return lambda proposals: [run_trial(runner, p) for p in proposals]


def run_study(space: Space, objective: Objective, run_batch: BatchFn, *, trials: int, seed: int = 0,
              batch_size: int = 1, timeout_s: float | None = None, on_start: StartFn | None = None,
              on_trial: TrialFn | None = None, should_cancel: CancelFn | None = None,
              dev_paths: Sequence[str] = (), setup_s: float = 0.0) -> StudyReport:
    """Run up to `trials` trials (or the whole grid, if smaller), within `timeout_s` seconds when given.

    Trials are proposed `batch_size` at a time and told back in proposal order, so a study whose batches
    run on several workers proposes, scores and chooses exactly what one process running the same
    batches does with the same seed. A trial that raises is recorded as failed and the study goes on;
    cancelling (`should_cancel`) raises MergeCancelled between batches. Raises PivotMergeError when
    no trial completed.
    """
    if trials < 1:
        raise SpecError("trials: must be at least 1")
    if batch_size < 1:
        raise SpecError("batch_size: must be at least 1")
    direction = DIRECTION[objective]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=seed))
    grid = space.grid()
    if grid is not None:
        budget, sampler = min(trials, len(grid)), "grid"
        for label, values in grid[:budget]:
            _enqueue(study, space, label, values)
    else:
        budget, sampler = trials, "tpe"
        # Each candidate's defaults first: the study then always holds what a plain merge would give.
        for c in space.candidates[:trials]:
            _enqueue(study, space, c.label, c.defaults())
    if on_start is not None:
        on_start(budget)
    started = time.perf_counter()
    records: list[TrialRecord] = []
    seen: dict[str, TrialRecord] = {}  # setting -> the trial that ran it
    stopped = "grid" if sampler == "grid" and budget == len(grid or ()) else "budget"
    while len(records) < budget:
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("tuning cancelled")
        if timeout_s is not None and records and time.perf_counter() - started >= timeout_s:  # one batch at least
            stopped = "time"
            break
        asked = []
        for number in range(len(records), min(len(records) + batch_size, budget)):
            trial = study.ask()
            candidate, values = _propose(trial, space)
            key = json.dumps([candidate.label, values], sort_keys=True, default=str)
            proposal = Proposal(number, candidate.label, candidate.method.name, params_of(candidate, values))
            asked.append((trial, proposal, key))
        firsts = {key: p for _, p, key in reversed(asked) if key not in seen}
        ran = {r.number: r for r in run_batch(list(sorted(firsts.values(), key=lambda p: p.number)))}
        for trial, proposal, key in asked:
            record = ran.get(proposal.number) or _repeat(proposal, seen[key])
            seen.setdefault(key, record)
            if record.objective is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, record.objective)
            records.append(record)
            if on_trial is not None:
                on_trial(record)
    best = best_of(records, direction)
    if best is None:
        first = next((r.error for r in records if r.error), "no trial ran")
        raise PivotMergeError(f"tuning: no trial completed (first error: {first})")
    return StudyReport(objective=objective, direction=direction, sampler=sampler, seed=seed, budget_trials=trials,
                       budget_seconds=timeout_s, stopped=stopped, dev=list(dev_paths),
                       candidates=candidates_report(space), trials=records, best=best.number, setup_s=round(setup_s, 4),
                       seconds=round(time.perf_counter() - started, 4))


def _repeat(proposal: Proposal, original: TrialRecord) -> TrialRecord:
    """A setting proposed again: the first run's outcome, copied (nothing runs)."""
    if original.state == "failed":
        return original.model_copy(update={"number": proposal.number, "seconds": 0.0,
                                           "error": f"as trial {original.number}: {original.error}"})
    return TrialRecord(number=proposal.number, label=proposal.label, method=proposal.method, params=proposal.params,
                       state="repeat", objective=original.objective, dev=original.dev, seconds=0.0)


def failed_trial(proposal: Proposal, exc: Exception, seconds: float) -> TrialRecord:
    """The record of a proposal that raised `exc` after `seconds`: the study goes on, the error is the record."""
    return TrialRecord(number=proposal.number, label=proposal.label, method=proposal.method, params=proposal.params,
                       state="failed", seconds=round(seconds, 4),
                       error=str(exc) if isinstance(exc, PivotMergeError) else f"{type(exc).__name__}: {exc}")


def run_trial(runner: TrialRunner, proposal: Proposal) -> TrialRecord:
    """Run one proposal with `runner` and record it; an exception becomes a failed trial's error."""
    base = {"number": proposal.number, "label": proposal.label, "method": proposal.method, "params": proposal.params}
    started = time.perf_counter()
    try:
        result = runner.run(get_method(proposal.method), proposal.params)
    except MergeCancelled:
        raise
    except Exception as exc:  # a failing trial is recorded; the study goes on
        return failed_trial(proposal, exc, time.perf_counter() - started)
    value = objective_value(result.metrics, runner.objective)
    if not math.isfinite(value):  # a broken merge: NaN, or an infinite loss, chooses nothing
        return TrialRecord(**base, state="failed", dev=result.metrics, seconds=round(result.seconds, 4),
                           error=f"objective {runner.objective} is {'NaN' if math.isnan(value) else value} "
                                 "on the dev sets")
    return TrialRecord(**base, state="complete", objective=value, dev=result.metrics, seconds=round(result.seconds, 4),
                       merge_s=round(result.merge_s, 4), evaluate_s=round(result.evaluate_s, 4))


def best_spec(spec: MergeSpec, study: StudyReport) -> dict[str, Any]:
    """The merge spec of the chosen trial, as JSON: what `pivotmerge merge` reruns."""
    best = study.best_trial()
    return trial_spec(spec, get_method(best.method), best.params).model_dump(mode="json")


def top_trials(study: StudyReport, n: int = 5) -> list[TrialRecord]:
    """The best `n` distinct scored trials, best first."""
    scored = [t for t in study.trials if t.state == "complete" and t.objective is not None]
    sign = 1.0 if study.direction == "minimize" else -1.0
    return sorted(scored, key=lambda t: sign * (t.objective or 0.0))[:n]


def plot_study(study: StudyReport, path: Path) -> None:
    """PNG: each trial's dev objective by trial number, one colour per candidate, best so far as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label in study.candidates:
        points = [(t.number, t.objective) for t in study.trials if t.label == label and t.objective is not None]
        if points:
            numbers, objectives = zip(*points)
            ax.scatter(numbers, objectives, label=label, s=22)
    failed = [t.number for t in study.trials if t.state == "failed"]
    scored = [(t.number, t.objective) for t in study.trials if t.objective is not None]
    if failed and scored:
        low = min(v for _, v in scored)
        ax.scatter(failed, [low] * len(failed), marker="x", color="black", label="failed")
    pick = min if study.direction == "minimize" else max
    best_so_far, xs, ys = None, [], []
    for number, value in scored:
        best_so_far = value if best_so_far is None else pick(best_so_far, value)
        xs.append(number)
        ys.append(best_so_far)
    ax.step(xs, ys, where="post", color="grey", linewidth=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"dev {study.objective} ({'lower' if study.direction == 'minimize' else 'higher'} is better)")
    ax.set_title(f"{len(study.trials)} trials, {study.sampler}; best: trial {study.best}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
