"""One trial: merge the spec's tensors with a method and parameters, in memory, and score the result
on the dev data, without re-reading or re-writing the model.

`TrialRunner` is built once per process and study:

* the merged tensors' inputs ([base?, *experts]) are read once; the tensors the spec does not merge
  are never read again (they are already in the evaluation model);
* the evaluation model (the reference repo: the base, else the first expert) is loaded once and
  each trial copies only its merged tensors into it;
* the dev sets are tokenised and their images decoded once;
* calibration data is measured once per kind of data a trial needs (Gram matrices, alignment
  scores) and handed to every later trial that needs the same;
* a trial fitted on the merged model's inputs (``gram_inputs: merged``) refits block after block, as
  `merge` does (`refit_blocks`: its own student model and each expert's block inputs, per trial); with
  a merged vocabulary its first pass is swapped into the evaluation model, whose layer inputs are then
  measured beside each expert's own (the experts are loaded once per study, when the first such trial runs);
* a method that fits blocks (``Need.BLOCK_FEATURES``) fits them from its per-tensor merge, as `merge` does.

A trial's tensors are the engine's own (`pivotmerge.run.streaming.merge_tensor`): the same
parameters, per-tensor seeds and output dtype, so the best trial written by `merge` scores what
the trial scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence

import torch

from pivotmerge.data.blocks import fit_blocks, refit_blocks
from pivotmerge.data.calibration import (NOT_CALIBRATED, Calibrated, calibrate, match_name,
                                         merged_input_grams_of_loaded, refit_on)
from pivotmerge.data.datasets import Dataset
from pivotmerge.data.evaluate import (CaptionBatch, DatasetMetrics, Loaded, answers, caption_batches, caption_stats,
                                      exact_match, load_model, perplexity)
from pivotmerge.errors import CompatibilityError, SpecError
from pivotmerge.methods import Calibration, Merged, Method, Need
from pivotmerge.plan.device import DTYPES, resolve_device
from pivotmerge.plan.params import resolve_all
from pivotmerge.plan.plan import MergePlan, plan_merge
from pivotmerge.run.streaming import merge_tensor
from pivotmerge.spec.schema import MergeSpec, spec_from_dict

Objective = Literal["loss", "accuracy", "qa"]
# What each objective reads from the dev metrics (mean over the dev sets, each set weighing the same).
OBJECTIVE_METRIC: dict[str, str] = {"loss": "caption_loss", "accuracy": "token_accuracy", "qa": "exact_match"}
DIRECTION: dict[str, Literal["minimize", "maximize"]] = {"loss": "minimize", "accuracy": "maximize", "qa": "maximize"}
BATCH_SIZE = 8
MAX_NEW_TOKENS = 8
# Measured per trial on its own merge (`TrialRunner.merged`), not once by `calibrate`.
REFIT_NEEDS = frozenset({Need.MERGED_INPUTS, Need.CROSS_GRAMS})


class TrialPlan(NamedTuple):
    """A trial's plan and the calibration data its tensors take."""

    plan: MergePlan
    calibrated: Calibrated


def trial_spec(spec: MergeSpec, method: Method, params: Mapping[str, Any]) -> MergeSpec:
    """`spec` merging with `method` and `params` (per-model parameters of another method dropped)."""
    data = spec.model_dump(mode="json", exclude={"evaluate", "evaluate_inputs"})
    data["method"] = method.name
    data["parameters"] = dict(params)
    if method.name != spec.method:
        for model in data["models"]:
            model["parameters"] = {}
    return spec_from_dict(data)


def objective_value(metrics: Sequence[DatasetMetrics], objective: Objective) -> float:
    """The mean of the objective's metric over the dev sets that have it (NaN when none has)."""
    values = [getattr(m, OBJECTIVE_METRIC[objective]) for m in metrics]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def check_dev(dev: Sequence[Dataset], objective: Objective) -> None:
    """The dev sets can score `objective`; errors name the field."""
    if not dev:
        raise SpecError("dev: give at least one dev dataset")
    if objective == "qa" and not any(d.has_qa for d in dev):
        raise SpecError("objective: qa needs dev records with a question and an answer")


@dataclass
class DevSet:
    dataset: Dataset
    batches: list[CaptionBatch]


@dataclass(frozen=True)
class TrialResult:
    metrics: list[DatasetMetrics]
    seconds: float
    merge_s: float
    evaluate_s: float


class TrialRunner:
    """Everything trials share, read or measured once: see the module docstring."""

    def __init__(self, spec: MergeSpec, dev: Sequence[Dataset], objective: Objective, *,
                 allowed_roots: Sequence[str | Path] | None = None, relative_to: Path | None = None) -> None:
        check_dev(dev, objective)
        self.spec = spec
        self.objective = objective
        self._roots = None if allowed_roots is None else [Path(r) for r in allowed_roots]
        self._relative_to = relative_to
        self._plan = plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to)
        try:
            self.device = resolve_device(spec.device)
            self._depths = {n: self._plan.places[n].depth for n in sorted(self._plan.merged)}
            self._dtypes = {o.name: o.dtype for o in self._plan.outputs}
            self.inputs = {n: [r.get(n) for r in self._plan.repos()] for n in self._depths}
            self.loaded = load_model(self._plan.reference.path, self.device.type)
            self._targets = _parameters(self.loaded, self._depths)
            _round_to_output_dtype(self.loaded, spec)
            self.dev = [DevSet(d, caption_batches(self.loaded.processor, d.records, BATCH_SIZE, d.prompt)) for d in dev]
        except BaseException:
            self._plan.close()
            raise
        self._calibration: dict[frozenset[Need], Mapping[str, Calibration]] = {}
        self._calibration_sets: list[Dataset] = []  # each expert's calibration set, once measured
        self._experts: list[Loaded] | None = None  # loaded for the first refit trial
        self.calibration_reports: dict[str, Any] = {}

    def close(self) -> None:
        self._plan.close()

    def __enter__(self) -> "TrialRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plan(self, method: Method, params: Mapping[str, Any]) -> TrialPlan:
        """The study's plan with `method` and `params`, with its calibration data (measured once per kind)."""
        spec = trial_spec(self.spec, method, params)
        plan = replace(self._plan, spec=spec, method=method, tensor_params=resolve_all(spec, method, self._depths))
        if not plan.needs:
            return TrialPlan(plan, NOT_CALIBRATED)
        # What `calibrate` measures once: the merged-input Grams (cross Grams with them) change with every
        # trial's merge, so `merged` measures those per trial.
        needs = frozenset(plan.needs - REFIT_NEEDS)
        if needs not in self._calibration:
            calibrated = calibrate(plan, self.device, allowed_roots=self._roots, relative_to=self._relative_to)
            self._calibration[needs] = calibrated.tensors
            self._calibration_sets = self._calibration_sets or calibrated.datasets
            self.calibration_reports["+".join(sorted(n.value for n in needs))] = calibrated.report
        measured = self._calibration[needs]
        # Trials with other parameters measure the same data for the tensors that need it.
        return TrialPlan(plan, Calibrated({}, self._calibration_sets,
                                          {n: measured[n] for n in plan.calibrated_tensors() if n in measured}))

    def merged(self, trial: TrialPlan) -> dict[str, torch.Tensor]:
        plan, calibrated = trial
        if Need.MERGED_INPUTS in plan.needs:
            calibrated = self._refit(plan, calibrated)
        tensors = self._merge_each(plan, calibrated)
        if Need.BLOCK_FEATURES in plan.needs:
            fitted, _ = fit_blocks(plan, calibrated.datasets, self.device,
                                   lambda n: self.inputs[n], lambda n: Merged(tensors[n]))
            tensors = {**tensors, **{n: m.tensor.to(self._dtypes[n]) for n, m in fitted.items()}}
        return tensors

    def _merge_each(self, plan: MergePlan, calibrated: Calibrated) -> dict[str, torch.Tensor]:
        return {n: merge_tensor(plan, n, self.inputs[n], self.device, self._dtypes[n],
                                calibration=calibrated.for_tensor(n))[0]
                for n in self._depths}

    def _refit(self, plan: MergePlan, calibrated: Calibrated) -> Calibrated:
        """Each block fitted on the inputs the merged blocks below it feed it, as `merge` does
        (`refit_blocks`); with a merged vocabulary, on a whole first pass's inputs (`_refit_on_first_pass`)."""
        if plan.vocabulary is not None:
            return self._refit_on_first_pass(plan, calibrated, self._merge_each(plan, calibrated))

        def merged(name: str, calibration: Calibration) -> torch.Tensor:
            return merge_tensor(plan, name, self.inputs[name], self.device, self._dtypes[name],
                                calibration=calibration)[0]

        tensors, _ = refit_blocks(plan, self._calibration_sets, self.device, lambda n: self.inputs[n], merged,
                                  calibrated.tensors)
        return replace(calibrated, tensors=tensors)

    def _refit_on_first_pass(self, plan: MergePlan, calibrated: Calibrated,
                             first_pass: Mapping[str, torch.Tensor]) -> Calibrated:
        """The first pass fitted each layer on the experts' own inputs: measure what it feeds its layers."""
        self.swap_in(first_pass)
        if self._experts is None:
            self._experts = [load_model(m.path, self.device.type) for m in self._plan.models]
        cross = plan.tensors_needing(Need.CROSS_GRAMS)
        per_expert = [merged_input_grams_of_loaded(self.loaded, expert, data, self._depths, cross, BATCH_SIZE)
                      for expert, data in zip(self._experts, self._calibration_sets, strict=True)]
        return replace(calibrated, tensors=refit_on(plan, calibrated.tensors, per_expert))

    @torch.no_grad()
    def swap_in(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            target = self._targets[name]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    def evaluate(self) -> list[DatasetMetrics]:
        """The loaded model's metrics on each dev set (exact match only for the qa objective: it generates)."""
        out = []
        for dev in self.dev:
            stats = caption_stats(self.loaded.model, dev.batches, self.loaded.device)
            qa = [r for r in dev.dataset.records if r.answer is not None] if self.objective == "qa" else []
            em = exact_match(answers(self.loaded, qa, BATCH_SIZE, MAX_NEW_TOKENS),
                             [r.answer or "" for r in qa]) if qa else None
            out.append(DatasetMetrics(dataset=dev.dataset.name, samples=len(dev.dataset.records), tokens=stats.tokens,
                                      caption_loss=stats.loss, perplexity=perplexity(stats.loss),
                                      token_accuracy=stats.accuracy, exact_match=em, questions=len(qa),
                                      prompt=dev.dataset.prompt))
        return out

    def run(self, method: Method, params: Mapping[str, Any]) -> TrialResult:
        """Merge with `method` and `params` and score the result on the dev sets."""
        started = time.perf_counter()
        tensors = self.merged(self.plan(method, params))
        merged_at = time.perf_counter()
        self.swap_in(tensors)
        metrics = self.evaluate()
        done = time.perf_counter()
        return TrialResult(metrics, done - started, merged_at - started, done - merged_at)


def _parameters(loaded: Loaded, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Merged tensor name -> the loaded model's parameter (or buffer) holding it."""
    held = {**dict(loaded.model.named_parameters()), **dict(loaded.model.named_buffers())}
    out = {}
    for name in names:
        target = match_name(name, held)
        if target is None:
            raise CompatibilityError(f"the evaluation model has no parameter for tensor {name}")
        out[name] = target
    return out


@torch.no_grad()
def _round_to_output_dtype(loaded: Loaded, spec: MergeSpec) -> None:
    """With the spec's `dtype`, the copied tensors as the output will hold them (rounded to it)."""
    if spec.dtype is None:
        return
    dtype = DTYPES[spec.dtype]
    for p in loaded.model.parameters():
        p.copy_(p.to(dtype).to(p.dtype))
