"""What calibration data tells the merge: Gram matrices and per-layer alignment scores.

* `collect_grams`: for each linear layer, ``G = X^T X`` of the inputs it sees on
  the calibration set (forward pre-hooks, float64 sums, padding left out). RegMean,
  RegMean folding and PivotMerge's ``combine: gram`` take these.
* `collect_merged_input_grams`: for ``gram_inputs: merged`` (RegMean++, PivotMerge), the
  same on the inputs a (first-pass) merged model feeds each layer, ``X~^T X~``,
  and, where the merge reads them (``Need.CROSS_GRAMS``), against the expert's own inputs on the
  same rows, ``X^T X~``.
* `alignment_scores`: for each expert and merged layer, how much the expert's
  caption loss rises when that layer's update is put back to the base: the
  layer's alignment contribution, which PivotMerge's ``layer_weighting: data``
  turns into per-expert weights and a layer scale. Cost: (layers + 1) passes
  over the calibration set per expert.
* `gram`, `cross_gram`, `loss_rises`, `normalised_alignment`: the maths itself, pure
  tensor functions, so the benchmark measures exactly what the engine does.
* `calibrate`: the engine's calibration stage: measures what the plan's tensors need
  (`MergePlan.needs`, from each method's ``needs(params)``) and returns it, per tensor
  (`Calibrated`); the plan stays as checked. Block features for distillation methods
  (``Need.BLOCK_FEATURES``) are measured block after block by `pivotmerge.data.blocks`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from pivotmerge.repos.architectures import architecture_for, place_tensors
from pivotmerge.data.datasets import Dataset, load_ref
from pivotmerge.errors import CompatibilityError, MergeCancelled, SpecError
from pivotmerge.data.evaluate import Loaded, caption_batches, caption_stats, load_model
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.repos.model_repo import ModelRepo
from pivotmerge.methods import NO_CALIBRATION, Calibration, Merged, Need
from pivotmerge.spec.schema import DatasetRef, MergeSpec
from pivotmerge.plan.plan import MergePlan


T = TypeVar("T")


def match_name(name: str, candidates: Mapping[str, T]) -> T | None:
    """The candidate named `name`, else the one whose name ends with it or it ends with (checkpoints
    and loaded models may differ by a prefix such as ``model.``); None when absent or ambiguous."""
    if name in candidates:
        return candidates[name]
    hits = [v for k, v in candidates.items() if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def in_model(name: str, candidates: Mapping[str, T], canonical: Callable[[str], str]) -> T | None:
    """The candidate for a checkpoint's tensor `name`: by its current-style name, else by `match_name`."""
    hit = candidates.get(canonical(name))
    return hit if hit is not None else match_name(name, candidates)


def linear_modules(model: nn.Module, tensor_names: Iterable[str]) -> dict[str, nn.Linear]:
    """Tensor name (``....weight``) -> the nn.Linear holding it, for those that are linear weights."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # On-disk names may be in the legacy style (`language_model.model.*`); the family table maps them.
    canonical = architecture_for(getattr(model.config, "model_type", None)).canonical
    out = {}
    for name in tensor_names:
        if name.endswith(".weight"):
            module = in_model(name.removesuffix(".weight"), modules, lambda n: canonical(n + ".weight").removesuffix(".weight"))
            if module is not None:
                out[name] = module
    return out


Hooks = TypeVar("Hooks", bound="LayerInputs")


class LayerInputs(ABC):
    """Forward pre-hooks handing each module's input to `take` as float64 rows, padding left out.

    Set `token_mask` (batch x sequence) before a forward pass so padded positions
    of sequence activations are left out; inputs of other shapes (image patches,
    fewer per image than the sequence holds) are taken whole.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.token_mask: torch.Tensor | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self.token_mask is not None and x.shape[:-1] == self.token_mask.shape:
                x = x[self.token_mask]
            self.take(name, x.reshape(-1, x.shape[-1]).to(torch.float64))
        return hook

    @abstractmethod
    def take(self, name: str, rows: torch.Tensor) -> None:
        """Receive one run of module `name`: its input as a (rows x features) float64 matrix."""

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self: Hooks) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------- the maths, as pure tensor functions
# The engine's hooks and the benchmark's in-memory projectors both call these, so both measure the same thing.


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``X^T X`` of a layer's inputs ``X`` (rows x features)."""
    return rows.T @ rows


def cross_gram(own: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """``X^T X~``: an expert's own inputs ``X`` of a layer against those a merged model feeds it, ``X~``, row for row."""
    return own.T @ seen


def loss_rises(baseline: Sequence[float], ablated: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Layer group -> each expert's alignment contribution: the rise of its caption loss when the group's
    update is put back to the base (`ablated`) over its loss as it is (`baseline`); a harmful or idle update counts 0."""
    return {g: [max(0.0, a - b) for a, b in zip(losses, baseline)] for g, losses in ablated.items()}


def normalised_alignment(contributions: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Contributions over the largest one of all experts and groups, in [0, 1], so layers and experts
    stay comparable for the layer scale (all 0 when no update helps)."""
    top = max((c for cs in contributions.values() for c in cs), default=0.0)
    return {g: [c / top if top > 0 else 0.0 for c in cs] for g, cs in contributions.items()}


def add_to(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add `value` into `sums[name]`; the first value starts the sum, as a layer's width is known only then."""
    sums[name] = sums[name] + value if name in sums else value


class GramCollector(LayerInputs):
    """Sums ``x^T x`` of each module's input in float64 (`grams`), and counts the rows (`rows`)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        super().__init__(modules)

    def take(self, name: str, rows: torch.Tensor) -> None:
        add_to(self.grams, name, gram(rows))
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]


class InputCapture(LayerInputs):
    """Keeps each module's inputs of the current batch, until `pop` hands them over."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self._inputs: dict[str, list[torch.Tensor]] = {}
        super().__init__(modules)

    def take(self, name: str, rows: torch.Tensor) -> None:
        self._inputs.setdefault(name, []).append(rows)

    def pop(self) -> dict[str, torch.Tensor]:
        """Name -> the rows captured since the last pop (a module run twice in a pass gives both runs' rows)."""
        out = {name: torch.cat(parts) for name, parts in self._inputs.items()}
        self._inputs.clear()
        return out


def _forward(loaded: Loaded, inputs: Mapping[str, torch.Tensor], hooks: LayerInputs) -> None:
    """One forward pass of `loaded` on a caption batch, with `hooks` masking out its padding."""
    on_device = {k: v.to(loaded.device) for k, v in inputs.items()}
    on_device["pixel_values"] = on_device["pixel_values"].to(loaded.model.dtype)
    hooks.token_mask = on_device["attention_mask"].bool()
    loaded.model(**on_device)


@torch.no_grad()
def grams_of_loaded(loaded: Loaded, dataset: Dataset, tensor_names: Iterable[str],
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    modules = linear_modules(loaded.model, tensor_names)
    with GramCollector(modules) as collector:
        for batch in caption_batches(loaded.processor, dataset.records, batch_size, dataset.prompt):
            _forward(loaded, batch.inputs, collector)
    return {name: g.cpu() for name, g in collector.grams.items()}


def collect_grams(model_dir: str | Path, dataset: Dataset, tensor_names: Iterable[str], *,
                  device: str = "auto", batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Gram matrices (float64, ``in x in``) of the inputs of the linear layers among `tensor_names`.

    Names that are not weights of an nn.Linear are left out: RegMean averages them.
    """
    return grams_of_loaded(load_model(model_dir, device), dataset, tensor_names, batch_size)


@dataclass
class MergedInputGrams:
    """One expert's statistics for fitting layers on a merged model's inputs (``gram_inputs: merged``).

    Per linear weight, with ``X~`` the inputs the merged model feeds the layer and
    ``X`` those the expert's own model feeds it, on the same calibration rows.
    """

    grams: dict[str, torch.Tensor]  # X~^T X~
    cross_grams: dict[str, torch.Tensor]  # X^T X~, for the weights whose merge reads it (Need.CROSS_GRAMS)


@torch.no_grad()
def merged_input_grams_of_loaded(merged: Loaded, expert: Loaded, dataset: Dataset, tensor_names: Iterable[str],
                                 cross_names: Collection[str], batch_size: int = 8) -> MergedInputGrams:
    """`MergedInputGrams` of `tensor_names`, the cross Grams of those in `cross_names` only (the expert's model runs
    only if there are any)."""
    names = list(tensor_names)
    crossed = [n for n in names if n in cross_names]
    grams: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    with InputCapture(linear_modules(expert.model, crossed)) as own, \
            InputCapture(linear_modules(merged.model, names)) as seen:
        # The expert's processor tokenises, as for its own Grams; both models then run on the very
        # same tensors, so the captured rows pair up. Only one batch's inputs are held at a time.
        for batch in caption_batches(expert.processor, dataset.records, batch_size, dataset.prompt):
            if crossed:
                _forward(expert, batch.inputs, own)
            _forward(merged, batch.inputs, seen)
            expert_rows = own.pop()
            for name, rows in seen.pop().items():
                add_to(grams, name, gram(rows))
                if name in expert_rows:
                    add_to(cross, name, cross_gram(expert_rows[name], rows))
    return MergedInputGrams({n: g.cpu() for n, g in grams.items()}, {n: c.cpu() for n, c in cross.items()})


def collect_merged_input_grams(merged_dir: str | Path, expert_dirs: Sequence[str | Path], datasets: Sequence[Dataset],
                               tensor_names: Iterable[str], cross_names: Collection[str], *, device: str = "auto",
                               batch_size: int = 8,
                               progress: ProgressFn | None = None,
                               should_cancel: CancelFn | None = None) -> list[MergedInputGrams]:
    """Per expert, on its own calibration set: each linear layer's merged-input Gram and, for `cross_names`, its
    expert-x-merged cross Gram.

    The merged model is loaded once and the experts one at a time, so at most two
    models are in memory.
    """
    names = list(tensor_names)
    merged = load_model(merged_dir, device)
    out = []
    for i, (expert_dir, data) in enumerate(zip(expert_dirs, datasets, strict=True)):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        out.append(merged_input_grams_of_loaded(merged, load_model(expert_dir, device), data, names, cross_names,
                                                batch_size))
        if progress is not None:
            progress(Progress("refit", i + 1, len(expert_dirs)))
    return out


# ----------------------------------------------------------------- alignment


def layer_groups(tensor_names: Iterable[str], model_type: str | None = "llava") -> dict[str, list[str]]:
    """Merged tensors grouped by layer (``projector.1``, ``language_model.3``); unlayered ones alone."""
    places = place_tensors(architecture_for(model_type), list(tensor_names))
    groups: dict[str, list[str]] = {}
    for name, place in places.items():
        key = f"{place.component_name}.{place.layer}" if place.layer is not None else name
        groups.setdefault(key, []).append(name)
    return groups


@dataclass
class AlignmentScores:
    groups: dict[str, list[str]]
    baseline: list[float]  # each expert's caption loss
    ablated: dict[str, list[float]]  # each expert's caption loss with the group's update removed

    @property
    def contributions(self) -> dict[str, list[float]]:
        return loss_rises(self.baseline, self.ablated)

    @property
    def scores(self) -> dict[str, list[float]]:
        return normalised_alignment(self.contributions)

    def for_tensor(self, name: str) -> list[float] | None:
        scores = self.scores
        return next((scores[g] for g, names in self.groups.items() if name in names), None)

    def report(self) -> dict[str, Any]:
        return {"baseline_loss": self.baseline, "ablated_loss": self.ablated,
                "contributions": self.contributions, "scores": self.scores}


@torch.no_grad()
def alignment_scores(base_dir: str | Path, expert_dirs: Sequence[str | Path], dataset: Dataset | Sequence[Dataset],
                     tensor_names: Iterable[str], *, device: str = "auto", batch_size: int = 8,
                     groups: Mapping[str, list[str]] | None = None) -> AlignmentScores:
    """Each expert's caption loss on `dataset` (one for all, or one per expert), whole and with each
    layer group's update removed."""
    datasets = [dataset] * len(expert_dirs) if isinstance(dataset, Dataset) else list(dataset)
    tensor_names = list(tensor_names)
    groups = dict(groups) if groups is not None else layer_groups(tensor_names)
    with ModelRepo.open(str(base_dir)) as base:
        pivot = {n: base.get(n) for n in tensor_names}
    baseline, ablated = [], {g: [] for g in groups}
    for expert_dir, data in zip(expert_dirs, datasets, strict=True):
        loaded = load_model(expert_dir, device)
        batches = caption_batches(loaded.processor, data.records, batch_size, data.prompt)
        params = dict(loaded.model.named_parameters())
        canonical = architecture_for(getattr(loaded.model.config, "model_type", None)).canonical
        baseline.append(caption_stats(loaded.model, batches, loaded.device).loss)
        for group, names in groups.items():
            targets = {n: in_model(n, params, canonical) for n in names}
            missing = [n for n, p in targets.items() if p is None]
            if missing:
                raise CompatibilityError(f"{expert_dir}: the loaded model has no parameter for tensor {missing[0]}")
            saved = {n: p.detach().clone() for n, p in targets.items()}
            for n, p in targets.items():
                p.copy_(pivot[n].to(device=p.device, dtype=p.dtype))
            ablated[group].append(caption_stats(loaded.model, batches, loaded.device).loss)
            for n, p in targets.items():
                p.copy_(saved[n])
    return AlignmentScores(groups=dict(groups), baseline=baseline, ablated=ablated)


# ----------------------------------------------------------------- engine hook


def expert_calibration(spec: MergeSpec) -> list[DatasetRef]:
    """Each expert's calibration set: its own `models[].calibration`, else the spec-wide one.

    RegMean is defined with each expert's Gram matrices taken on the data it was
    aligned on, so a per-expert set is the faithful setting; the shared one is the fallback.
    """
    refs = []
    for i, entry in enumerate(spec.models):
        ref = entry.calibration or spec.calibration
        if ref is None:
            field = "calibration" if not spec.gives_calibration else f"models.{i}.calibration"
            raise SpecError(f"{field}: method {spec.method!r} as configured needs calibration data for every expert "
                            "(set `calibration`, or `calibration` on each model)")
        refs.append(ref)
    return refs


def load_expert_calibration(refs: Sequence[DatasetRef], *, allowed_roots: Sequence[Path] | None = None,
                            relative_to: Path | None = None) -> list[Dataset]:
    """The datasets of `refs`, each distinct reference loaded (and checked) once."""
    loaded: dict[str, Dataset] = {}
    for ref in refs:
        key = ref.model_dump_json()
        if key not in loaded:
            loaded[key] = load_ref(ref, allowed_roots=allowed_roots, relative_to=relative_to)
    return [loaded[ref.model_dump_json()] for ref in refs]


@dataclass(frozen=True)
class Calibrated:
    """What calibration data gave a merge: each tensor's `Calibration` (only tensors whose parameters need
    data have one), and for methods that fit blocks (`Need.BLOCK_FEATURES`) the fitted tensors."""

    report: dict[str, Any]  # the merge report's `calibration` section
    datasets: list[Dataset]  # each expert's calibration set; empty when the method reads none
    tensors: Mapping[str, Calibration] = field(default_factory=dict)
    fitted: Mapping[str, Merged] = field(default_factory=dict)  # tensor -> its block's fit

    def for_tensor(self, name: str) -> Calibration:
        return self.tensors.get(name, NO_CALIBRATION)


NOT_CALIBRATED = Calibrated({}, [])


def calibrate(plan: MergePlan, device: torch.device, *, allowed_roots: Sequence[Path] | None = None,
              relative_to: Path | None = None, progress: ProgressFn | None = None) -> Calibrated:
    """Measure what the plan's tensors need (`MergePlan.needs`) on calibration data and return it (the
    plan is left as checked).

    Gram matrices for ``Need.GRAMS`` (RegMean, PivotMerge's ``combine: gram``), per-expert
    alignment scores per layer for ``Need.ALIGNMENT`` (PivotMerge's ``layer_weighting:
    data``). Each expert is measured on its own calibration set when it has one
    (`expert_calibration`).
    """
    spec = plan.spec
    needs = plan.needs
    if not needs:
        return NOT_CALIBRATED
    if Need.ALIGNMENT in needs and plan.base is None:
        raise SpecError("base_model: layer_weighting: data removes each layer's update, so it needs the base")
    datasets = load_expert_calibration(expert_calibration(spec), allowed_roots=allowed_roots, relative_to=relative_to)
    names = sorted(plan.merged)
    report: dict[str, Any] = {"datasets": [{"model": m.model, "dataset": str(d.path), "samples": len(d.records),
                                            "prompt": d.prompt}
                                           for m, d in zip(spec.models, datasets)]}
    if progress is not None:
        progress(Progress("calibrate", 0, len(plan.models), message="calibration data: " + ", ".join(dict.fromkeys(d.name for d in datasets))))
    grams: dict[str, list[torch.Tensor]] = {}
    if Need.GRAMS in needs:
        per_model = []
        for i, (repo, data) in enumerate(zip(plan.models, datasets)):
            per_model.append(collect_grams(repo.path, data, names, device=device.type))
            if progress is not None:
                progress(Progress("calibrate", i + 1, len(plan.models)))
        report["gram_tensors"] = sorted(per_model[0])
        grams = {n: [g[n] for g in per_model] for n in per_model[0]}
    alignment: dict[str, list[float] | None] = {}
    if Need.ALIGNMENT in needs:
        assert plan.base is not None  # checked above, before any data is read
        scores = alignment_scores(plan.base.path, [m.path for m in plan.models], datasets, names, device=device.type,
                                  groups=layer_groups(names, plan.reference.model_type))
        report["alignment"] = scores.report()
        alignment = {n: scores.for_tensor(n) for n in names}
    tensors = {n: Calibration(grams=grams.get(n), alignment=alignment.get(n)) for n in plan.calibrated_tensors()}
    return Calibrated(report, datasets, tensors)


def refit_on(plan: MergePlan, calibration: Mapping[str, Calibration],
             per_expert: Sequence[MergedInputGrams]) -> dict[str, Calibration]:
    """`calibration` for a second pass: each linear weight's merged-input Grams replace its Grams, with its cross
    Grams where they were measured; the alignment scores stay as measured once on the experts."""
    refit = {name: replace(calibration.get(name, NO_CALIBRATION), grams=[p.grams[name] for p in per_expert],
                           cross_grams=[p.cross_grams[name] for p in per_expert] if name in per_expert[0].cross_grams
                           else None)
             for name in per_expert[0].grams}
    return {**calibration, **{n: c for n, c in refit.items() if n in plan.calibrated_tensors()}}


def merged_input_calibration(plan: MergePlan, first_pass: Path, calibrated: Calibrated, device: torch.device, *,
                             progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Calibrated:
    """`calibrated` for a second merge pass: what fits each layer on the inputs of the first pass's model.

    Each linear weight's ``grams`` become those of the inputs the model in
    `first_pass` feeds it, with the matching ``cross_grams``; the alignment scores
    stay as measured once on the experts.
    """
    if progress is not None:
        progress(Progress("refit", 0, len(plan.models), message="layer inputs of the first merge pass, beside each expert's own"))
    per_expert = collect_merged_input_grams(first_pass, [m.path for m in plan.models], calibrated.datasets,
                                            sorted(plan.merged), plan.tensors_needing(Need.CROSS_GRAMS),
                                            device=device.type, progress=progress,
                                            should_cancel=should_cancel)
    return replace(calibrated, report={**calibrated.report, "gram_inputs": "merged", "passes": 2},
                   tensors=refit_on(plan, calibrated.tensors, per_expert))
