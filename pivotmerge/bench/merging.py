"""Merging the suite's projectors with the product's method registry.

Every merge calls ``get_method(name)`` on the projector's tensors in memory, so
the benchmark measures the product's code. What a method needs from calibration
data (input Gram matrices for RegMean, alignment scores for PivotMerge's data
mode) is computed here from the suite's calibration images and passed in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from pivotmerge.methods import get_method
from pivotmerge.bench.models import PROJECTOR_LAYERS, Encoded, LanguageModel, State, _row_loss, Projector, layer_inputs


@dataclass(frozen=True)
class Variant:
    """One row of the table: a registry method, fixed parameters and a dev-split grid."""

    name: str
    method: str
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    data: bool = False  # uses calibration data

    def candidates(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [{**self.fixed, **dict(zip(keys, values))} for values in itertools.product(*self.grid.values())]


SCALES = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5]
# PivotMerge's layer scale runs from lambda_min (layer score 0) to lambda_max (score 1).
LAYER_SCALES = {"lambda_max": [0.1, 0.25, 0.5, 0.75, 1.0], "lambda_min": [0.1, 0.25, 0.5]}
UNIFORM_SCALES = {"lambda_max": [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]}  # uniform weighting uses lambda_max alone
SPECTRA = {"spectrum": ["flatten", "flatten_total"]}
# PivotMerge's filtering is off by default; the rows that search its threshold turn it on.
FILTERING = {"conflict_threshold": [0.5, 0.8]}
FILTERED = {"filtering": True}
UNIFORM = {"layer_weighting": "uniform"}

VARIANTS: tuple[Variant, ...] = (
    Variant("linear", "linear"),
    Variant("task_arithmetic", "task_arithmetic", grid={"lambda": SCALES}),
    Variant("ties", "ties", grid={"lambda": [0.25, 0.5, 0.75, 1.0], "density": [0.2, 0.5, 0.8]}),
    Variant("dare_ties", "dare_ties", fixed={"normalize": True}, grid={"lambda": [0.25, 0.5, 0.75, 1.0], "density": [0.3, 0.6]}),
    Variant("tsv", "tsv", grid={"alpha": SCALES}),
    Variant("iso_c", "iso_c", grid={"alpha": SCALES + [2.0]}),
    Variant("iso_cts", "iso_cts", grid={"alpha": SCALES + [2.0], "common_space_fraction": [0.6, 0.8]}),
    Variant("regmean", "regmean", grid={"alpha": [0.5, 0.9, 1.0]}, data=True),
    # RegMean++: the baseline for what PivotMerge's gram_inputs: merged borrows from it.
    Variant("regmean_plus_plus", "regmean", fixed={"gram_inputs": "merged"}, grid={"alpha": [0.5, 0.9, 1.0]}, data=True),
    Variant("pivotmerge", "pivotmerge", fixed=FILTERED, grid={**LAYER_SCALES, **SPECTRA, **FILTERING}),
    Variant("pivotmerge_data", "pivotmerge", fixed={"layer_weighting": "data", "combine": "gram"},
            # residual_weight 1 keeps whole deltas, so keep + lambda 1/K reaches RegMean's matrices
            # (gram_inputs: expert) or the least-squares refit on the merged inputs (merged).
            grid={"gram_inputs": ["expert", "merged"], "lambda_max": [0.25, 0.5], "lambda_min": [0.25, 0.5],
                  "spectrum": ["keep", "flatten_total"], "residual_weight": [0.5, 1.0], "gram_alpha": [0.9, 1.0]},
            data=True),
    Variant("pivotmerge_no_filtering", "pivotmerge", fixed={"filtering": False}, grid={**LAYER_SCALES, **SPECTRA}),
    Variant("pivotmerge_no_layer_weighting", "pivotmerge", fixed={**UNIFORM, **FILTERED}, grid={**UNIFORM_SCALES, **SPECTRA, **FILTERING}),
    Variant("pivotmerge_no_filtering_no_layer_weighting", "pivotmerge", fixed={**UNIFORM, "filtering": False},
            grid={**UNIFORM_SCALES, **SPECTRA}),
)


@dataclass
class Calibration:
    """What calibration data tells the data-using methods, per expert (one per domain)."""

    grams: list[dict[str, torch.Tensor]]  # expert -> layer -> X^T X of that layer's inputs on its domain
    alignment: dict[str, list[float]]  # layer -> per-expert score in [0, 1]
    inputs: list[dict[str, torch.Tensor]]  # expert -> layer -> X, that layer's inputs on its domain
    feats: list[torch.Tensor]  # expert -> its domain's calibration vision features

    def merged_inputs(self, merged: State) -> list[dict[str, dict[str, torch.Tensor]]]:
        """``grams`` and ``cross_grams`` per expert and layer when the layers see ``merged``'s inputs:
        ``X~^T X~`` and ``X^T X~`` on each expert's calibration features (what the engine's refit pass measures)."""
        out = []
        for own, feats in zip(self.inputs, self.feats):
            seen = layer_inputs(merged, feats)
            out.append({layer: {"grams": seen[layer].T @ seen[layer], "cross_grams": own[layer].T @ seen[layer]}
                        for layer in own})
        return out


def layer_of(key: str) -> str:
    """The projector layer a tensor belongs to: ``fc1.weight`` -> ``fc1``."""
    return key.split(".")[0]


@torch.no_grad()
def _caption_loss(state: State, lm: LanguageModel, data: Encoded) -> float:
    projector = Projector()
    projector.load_state_dict(state)
    rows = torch.arange(len(data.split.texts))
    ce, _ = _row_loss(lm, projector, data, rows)
    return float(ce[data.split.target_mask].mean())


def calibrate(experts: list[State], base: State, lm: LanguageModel, calib: list[Encoded]) -> Calibration:
    """Gram matrices and alignment scores from each expert's own domain's calibration set.

    Alignment ``a[k, l]``: how much expert ``k``'s loss on its calibration data
    rises when layer ``l``'s update is reverted to the base, relative to its
    largest such rise over layers, so the layer that carries the expert's
    alignment scores 1.
    """
    inputs = [layer_inputs(e, c.feats) for e, c in zip(experts, calib)]
    grams = [{name: x.T @ x for name, x in own.items()} for own in inputs]
    rises: dict[str, list[float]] = {layer: [] for layer in PROJECTOR_LAYERS}
    for expert, data in zip(experts, calib):
        own = _caption_loss(expert, lm, data)
        for layer in PROJECTOR_LAYERS:
            reverted = {k: (base[k] if layer_of(k) == layer else v) for k, v in expert.items()}
            rises[layer].append(max(0.0, _caption_loss(reverted, lm, data) - own))
    top = [max(rises[layer][k] for layer in PROJECTOR_LAYERS) or 1.0 for k in range(len(experts))]
    alignment = {layer: [r / t for r, t in zip(rises[layer], top)] for layer in PROJECTOR_LAYERS}
    return Calibration(grams, alignment, inputs, [c.feats for c in calib])


def merge(variant: Variant, params: dict[str, Any], experts: list[State], base: State,
          calibration: Calibration | None = None, seed: int = 0) -> State:
    """Merge the experts' projectors tensor by tensor with the registry's method.

    ``gram_inputs: merged`` merges twice, as the engine does: the second pass fits
    each layer on the inputs the first pass's merged projector feeds it.
    """
    first = _merge_pass(variant, params, experts, base, calibration, seed)
    if params.get("gram_inputs") != "merged":
        return first
    assert calibration is not None, f"{variant.name} needs calibration data"
    return _merge_pass(variant, params, experts, base, calibration, seed, calibration.merged_inputs(first))


def _merge_pass(variant: Variant, params: dict[str, Any], experts: list[State], base: State,
                calibration: Calibration | None, seed: int,
                refit: list[dict[str, dict[str, torch.Tensor]]] | None = None) -> State:
    method = get_method(variant.method)
    weights = [1.0] * len(experts)
    out: State = {}
    for i, key in enumerate(base):
        values = dict(params)
        if variant.data:
            assert calibration is not None, f"{variant.name} needs calibration data"
            values.update(data_params(variant.method, key, calibration))
            if refit is not None:
                values.update({name: [r[layer_of(key)][name] for r in refit] for name in ("grams", "cross_grams")})
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        tensors = [e[key] for e in experts]
        out[key] = method(tensors, base[key], weights, method.params(**values), generator).tensor
    return out


def data_params(method: str, key: str, calibration: Calibration) -> dict[str, Any]:
    """The per-tensor, data-derived parameters a data-using method takes."""
    layer = layer_of(key)
    grams = {"grams": [g[layer] for g in calibration.grams]}
    return {**grams, "alignment": calibration.alignment[layer]} if method == "pivotmerge" else grams
