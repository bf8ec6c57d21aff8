"""The tuning request: what POST /v1/tunings accepts and the tuning job's worker runs (the job keeps it
as its `spec`, with its defaults filled in). The words of `pivotmerge tune` (docs/tuning.md)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pivotmerge.spec.schema import DatasetRef, MergeSpec, untextual_string

from core.models import CANDIDATE_MAX_CHARS

MAX_TRIALS = 1000

def non_finite_number(value: Any, where: str) -> str | None:
    """The first NaN or infinity in `value`, as "<field>: <why>"; None if there is none. JSON can carry them
    (as Python writes it), but no parameter's setting is one."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value} is not a finite number"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for key, item in items if (found := non_finite_number(item, f"{where}.{key}"))), None)


CandidateLabel = Annotated[str, Field(min_length=1, max_length=CANDIDATE_MAX_CHARS)]


class TuningRequest(BaseModel):
    """A study: which merge to tune (`spec`), over which candidates (`space`, `methods`), scored on which
    data (`dev`), with which budget. The words of `pivotmerge tune` (docs/tuning.md)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_and_finite_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict) and (problem := untextual_string(data) or non_finite_number(data.get("space"), "space")):
            raise ValueError(problem)
        return data

    spec: MergeSpec = Field(..., description=(
        "The merge spec: models, base, components, calibration data for the candidates that read it. Its `method` "
        "is the candidate when neither `space` nor `methods` names one; its `parameters` are fixed for that method."))
    space: dict[CandidateLabel, dict[str, Any] | None] = Field(default_factory=dict, description=(
        "Candidate label -> parameters, as the `tune.space` section of a `pivotmerge tune` spec: `{}` searches the "
        "method's declared space; a number or string fixes a parameter; a list searches those values; "
        "`{low, high[, log]}` a range; `method` names the method of a label that is not one."))
    methods: list[CandidateLabel] = Field(default_factory=list, max_length=64, description=(
        "Candidates to search: method names or labels of `space`. Default: the labels of `space`, else the spec's "
        "method; the accepted job lists them."))
    dev: list[DatasetRef] = Field(..., max_length=64, description=(
        "Dev datasets (at least one): the only data that chooses."))
    test: list[DatasetRef] = Field(default_factory=list, max_length=64, description=(
        "Test datasets, scored once, for the chosen trial only; never used to choose."))
    trials: int = Field(20, ge=1, le=MAX_TRIALS, description=(
        "Trial budget. A discrete space of at most 256 settings runs as a grid, in order, up to this many."))
    objective: Literal["loss", "accuracy", "qa"] = Field("accuracy", description=(
        "Mean over the dev sets of the caption loss (lower is better), token accuracy or QA exact match (higher)."))
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Sampler seed; default (and as accepted): the spec's seed.")
    timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "Time budget in seconds: no batch of trials starts after it (the first always runs)."))
    batch_size: int = Field(4, ge=1, le=64, description=(
        "Trials proposed and run at once, one per worker of the trials queue. Part of the study: the same seed "
        "and batch size propose the same trials, however many workers run them."))

