"""A tuning study as the merge report of its best trial holds it (``study``): every trial, the
candidates searched, and the test scores of the chosen trial beside its dev scores."""

from __future__ import annotations

from typing import Any, Literal, Protocol, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict

from pivotmerge.data.evaluate import DatasetMetrics
from pivotmerge.methods.description import SearchRange


class StudyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class CandidateReport(StudyModel):
    method: str
    fixed: dict[str, Any]
    searched: dict[str, SearchRange]  # as the method's description gives a searched parameter


class TrialRecord(StudyModel):
    """One trial: what it merged with, how it scored on the dev sets, how long it took.

    ``state``: complete; failed (``error`` says why; the study went on); repeat (the sampler
    proposed a setting already scored: its scores are copied, nothing ran).
    """

    number: int
    label: str  # the candidate: a method, or a setting of one the spec named
    method: str
    params: dict[str, Any]
    state: Literal["complete", "failed", "repeat"]
    objective: float | None = None
    dev: list[DatasetMetrics] = []  # per dev set
    seconds: float
    merge_s: float | None = None
    evaluate_s: float | None = None
    error: str | None = None


class StudyReport(StudyModel):
    objective: Literal["loss", "accuracy", "qa"]
    direction: Literal["minimize", "maximize"]
    sampler: Literal["tpe", "grid"]
    seed: int
    budget_trials: int
    budget_seconds: float | None = None
    stopped: Literal["budget", "time", "grid"]  # what ended the study
    dev: list[str]  # dev set paths: the only data the choice saw
    test: list[str] = []  # test set paths, scored once, for the best trial only
    candidates: dict[str, CandidateReport]
    trials: list[TrialRecord]
    best: int  # the chosen trial's number
    best_test: list[DatasetMetrics] | None = None  # per test set, of the best trial; never used to choose
    # Reading inputs, loading the evaluation model, tokenising the dev sets (0 when workers ran the trials).
    setup_s: float
    seconds: float

    def best_trial(self) -> TrialRecord:
        return next(t for t in self.trials if t.number == self.best)


class Scored(Protocol):
    @property
    def objective(self) -> float | None: ...


T = TypeVar("T", bound=Scored)


def best_of(trials: Sequence[T], direction: Literal["minimize", "maximize"]) -> T | None:
    """The trial a study chooses: the best dev objective, the earliest of equals; None when none scored."""
    scored = [t for t in trials if t.objective is not None]
    if not scored:
        return None
    return (min if direction == "minimize" else max)(scored, key=lambda t: t.objective or 0.0)
