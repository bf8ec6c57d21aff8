"""PivotMerge: shared-space decomposition, conflict filtering and layer weights.

Our reading of arXiv 2604.22823 (its abstract names the components, not the
formulas); docs/methods.md states every formula. Without data the experts' shared
parts are combined in the geometry of the layer's inputs (``combine: covariance``:
ACE-Merging's closed form, the row-centred task vectors standing in for the inputs),
spectrum kept, each matrix scaled by its separation. For one tensor of layer ``l``:

1. pivot ``W0`` (the base, else the experts' mean); deltas ``d_k = W_k - W0``;
2. shared space: the top left singular vectors ``U`` of ``[d_1 ... d_K]`` up to an
   energy fraction / max rank; coefficients ``C_k = U^T d_k``, residuals ``d_k - U C_k``;
3. filtering: direction ``j`` is suppressed when the experts' coefficient rows
   cancel: ``1 - ||sum_k a_k C_k[j]|| / sum_k |a_k| ||C_k[j]|| > threshold``;
   with ``combine: gram`` and calibration Gram matrices ``G_k`` of the layer's inputs, experts are
   combined as their inputs see them, a Gram-weighted mean ``(sum_k a_k X_k G_k)(sum_k a_k G_k)^-1``
   in place of ``sum_k a_k X_k`` (so scale 1 is RegMean's update; equal Grams give the weighted mean
   ``sum_k a_k X_k / sum_k a_k``); with ``gram_inputs: merged`` the
   layer is fitted on the inputs the merged model feeds it: ``G_k`` is then the Gram of those and
   ``C_k = X_k^T X~_k`` (expert inputs against merged inputs) replaces ``G_k`` on the left, plus the
   pivot's own correction ``W0 ((sum_k a_k C_k)(sum_k a_k G_k)^-1 - I)``;
4. spectrum of the merged shared update kept or flattened (Iso-C), or of the
   whole merged update, residuals included (``flatten_total``);
5. per-expert weights ``a_k`` and layer scale ``scale_l`` from a score in [0, 1]:
   the expert's energy share in the shared space (``weight``) or calibration
   alignment (``data``); by default (``separation``) a matrix's score is how far the
   combine kept the experts' updates apart (`separation`), so layers whose experts it
   can only average are damped;
6. ``W = W0 + scale_l (U M + rho * combine(trunc(R_k)))`` (flattened as a whole under ``flatten_total``);
   ``rho`` is 0 by default without data, 1 in the data mode.

Vectors (biases, norms) take a sign-consistent mean of the deltas, scaled like a layer.
A spec that gives calibration data and leaves them unset gets the data mode (`DATA_MODE`:
gram combine on the merged model's inputs, spectrum kept, residuals whole, scale 1).
With shared space, filtering and flattening off and uniform weights, this is
task arithmetic with ``scale = scale_max``.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Sequence

import torch
from pydantic import AliasChoices, Field, model_validator

from pivotmerge.methods import NO_CALIBRATION, Calibration, Merged, MethodParams, Need, Search, Tensor, method
from pivotmerge.methods.toolkit.consensus import elected_mask, masked_merge
from pivotmerge.methods.toolkit.deltas import column_weights, onto_base, weighted_sum
from pivotmerge.methods.toolkit.spectrum import flatten_spectrum, significant
from pivotmerge.methods.toolkit.svd import SvdMode, low_rank_svd, svd
from pivotmerge.methods.alignment import fit_aligned_block
from pivotmerge.methods.fields import (ExpertTarget, OffDiagonalScale, Scale, expert_target_field, fits_own_outputs,
                                      merged_input_needs, off_diagonal_scale_field)
from pivotmerge.methods.ace import Params as AceParams
from pivotmerge.methods.ace import ace_update
from pivotmerge.methods.regmean import regmean_solve


class Params(MethodParams):
    shared_space: bool = Field(True, description="Split each delta into its part in the experts' shared subspace and a residual.")
    energy: Annotated[float, Search(0.5, 0.99)] = Field(0.95, gt=0, le=1, description="Shared subspace: fewest directions holding this fraction of the stacked deltas' energy.")
    max_rank: int | None = Field(None, ge=1, description="Shared subspace: at most this many directions (required with svd: randomized).")
    filtering: bool = Field(False, description="Suppress shared directions on which the experts' updates cancel (off by default: it never helped on the bench's dev splits).")
    conflict_threshold: Annotated[float, Search(0.3, 0.9)] = Field(0.5, ge=0, le=1, description="Suppress a direction whose conflict score 1 - |sum| / sum|.| exceeds this.")
    residual_weight: Annotated[float, Search(0.0, 1.0)] = Field(
        0.0, ge=0, description="Weight of the experts' residuals outside the shared space; 0 (default without data: they "
                               "lowered dev accuracy on the quality suite) drops them.")
    residual_rank: int | None = Field(None, ge=1, description="Truncate each expert's residual to this rank; None keeps it whole.")
    spectrum: Annotated[Literal["keep", "flatten", "flatten_total"], Search(choices=("keep", "flatten", "flatten_total"))] = Field(
        "keep", description="keep the singular values; flatten: replace those of the merged shared update by their mean (Iso-C); "
                               "flatten_total: do so for the whole merged update, residuals included.")
    combine: Literal["covariance", "sum", "gram"] = Field(
        "covariance", description="covariance (default without data): ACE-Merging's closed form on the experts' shared "
                                  "parts, each expert weighted along the input directions its own update uses (its "
                                  "row-centred task-vector covariance stands in for its inputs' Gram); sum: weighted sum "
                                  "of the experts' parts; gram: combine them as the layer's inputs see them, "
                           "with per-expert Gram matrices from calibration data (matrices without them take the weighted mean).")
    off_diagonal_scale: OffDiagonalScale = off_diagonal_scale_field("gram_alpha")
    gram_inputs: Literal["expert", "merged"] = Field(
        "expert", description="combine: gram: fit each layer on each expert's own inputs (RegMean), or on the inputs the "
                              "merged model feeds it, so each layer also corrects what the merged layers before it changed "
                              "(RegMean++'s idea; the engine merges twice, the second time with the first merge's inputs).")
    expert_target: ExpertTarget = expert_target_field()
    layer_weighting: Literal["uniform", "weight", "separation", "data"] = Field(
        "separation", description="uniform: weights as given, scale_max; weight: data-free shared-energy proxy (expert "
                                  "weights and layer score); separation (default): the same expert weights, and a "
                                  "matrix's layer score is how far the combine keeps the experts' updates apart "
                                  "(near 0 where they overlap and the merged update is a mean, 1 where they add up); "
                                  "data: calibration alignment.")
    # Searched on a linear range from 0 (its default without data), where Scale's log range starts above it.
    scale_min: Annotated[float, Search(0.0, 1.0)] = Field(0.0, validation_alias=AliasChoices("scale_min", "lambda_min"),
                             description="Layer scale for a layer scoring 0: scale_l = scale_min + (scale_max - scale_min) * s_l.")
    scale_max: Scale = Field(0.6, validation_alias=AliasChoices("scale_max", "lambda_max"),
                             description="Layer scale for a layer scoring 1 (and every layer under uniform weighting).")
    distill_steps: int = Field(
        0, ge=0, description="Data mode's alignment-guided layer-wise fit: Adam steps per block from the closed form, "
                             "matching each expert on its own calibration data (0: the closed form as solved).")
    distill_learning_rate: Annotated[float, Search(1e-4, 1e-2, log=True)] = Field(
        0.003, gt=0, description="Adam's learning rate of that fit.")
    distill_objective: Literal["features", "captions"] = Field(
        "features", description="features: each expert's block outputs on its own inputs, the block fed the merged model's "
                                "features; captions: the frozen language model's next-token distributions of each expert.")
    distill_parameters: Literal["weights", "coefficients"] = Field(
        "weights", description="weights: a free update of every tensor; coefficients: one per tensor and expert, on the "
                               "expert's difference from the closed form.")
    svd: SvdMode = Field("auto", description="Shared-space and residual SVDs: exact; seeded randomized low-rank; or auto: "
                                             "randomized where it is much cheaper and its estimated error is under 1% of "
                                             "the kept part, else exact.")

    @model_validator(mode="after")
    def _randomized_needs_rank(self) -> "Params":
        if self.svd == "randomized" and self.shared_space and self.max_rank is None:
            raise ValueError("svd: randomized needs max_rank (the rank to sketch)")
        return self


# The defaults when a spec gives calibration data (parameters the user sets win): each layer fitted on the
# merged model's inputs, the fitted update whole and at its own scale; each choice is the quality suite's
# dev evidence (docs/methods.md): off_diagonal_scale 1 was RegMean++'s choice on every seed, and
# flattening the spectrum, halving the residuals or data layer weights each lowered dev accuracy here.
# The alignment-guided fit from that closed form (distill_steps) stays opt-in: over the quality suite's five
# seeds it added 0.15 points of test accuracy (4 of 5 seeds) for about three times the merge time (docs/methods.md).
DATA_MODE = {"combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs", "off_diagonal_scale": 1.0,
             "spectrum": "keep", "residual_weight": 1.0, "scale_min": 1.0, "scale_max": 1.0}


def needs(params: Params) -> set[Need]:
    out = {Need.ALIGNMENT} if params.layer_weighting == "data" else set()
    if params.combine == "gram":
        out |= merged_input_needs(params.gram_inputs, params.expert_target)
    if params.distill_steps > 0:
        out |= {Need.BLOCK_FEATURES, Need.CAPTION_OUTPUTS} if params.distill_objective == "captions" else {Need.BLOCK_FEATURES}
    return out


def layer_weights(params: Params, weights: Sequence[float], shares: Tensor,
                  alignment: Sequence[float] | None = None) -> tuple[list[float], float]:
    """Per-expert weights ``a_k`` and the layer score ``s_l`` in [0, 1].

    Scores ``e_k`` (shares, or alignment in data mode) reweight the experts with
    their sum kept: ``a_k = sum(w) * w_k e_k / sum_j w_j e_j``; ``s_l`` is the
    weight-averaged score. Uniform weighting gives ``a = w``, ``s_l = 1``.
    """
    if params.layer_weighting == "uniform":
        return [float(w) for w in weights], 1.0
    if params.layer_weighting == "data":
        if alignment is None:
            raise ValueError("layer_weighting: data needs alignment scores (from calibration data)")
        if len(alignment) != len(weights):
            raise ValueError(f"alignment: expected {len(weights)} scores (one per expert), got {len(alignment)}")
        if not all(0 <= a <= 1 for a in alignment):
            raise ValueError("alignment: scores must lie in [0, 1]")
        scores = [float(a) for a in alignment]
    else:
        scores = shares.tolist()
    total_w = sum(weights)
    scored = sum(w * e for w, e in zip(weights, scores))
    expert_weights = [float(w) for w in weights] if scored == 0 else [total_w * w * e / scored for w, e in zip(weights, scores)]
    score = scored / total_w if total_w else sum(scores) / len(scores)
    return expert_weights, min(1.0, max(0.0, score))


def separation(update: Tensor, expert_energy: Tensor) -> float:
    """How far a combine kept K experts' updates apart, in [0, 1]: ``rho = ||M|| / sqrt(mean_k ||d_k||^2)`` placed
    between ``1/sqrt(K)`` (0: the mean of K orthogonal updates of equal norm, as when every expert claims the same
    inputs) and ``sqrt(K)`` (1: their sum, each expert's update carried whole on inputs of its own)."""
    k = expert_energy.numel()
    mean_energy = float(expert_energy.mean())
    if k < 2 or mean_energy == 0:
        return 1.0
    rho = float(update.norm()) / mean_energy ** 0.5
    low, high = k ** -0.5, k ** 0.5
    return min(1.0, max(0.0, (rho - low) / (high - low)))


def _layer_scale(params: Params, score: float) -> float:
    return params.scale_min + (params.scale_max - params.scale_min) * score


def _interleaved_deltas(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """``(m, K, n)`` deltas, so ``view(m, K*n)`` is ``[d_1 ... d_K]`` without a copy."""
    out = torch.empty((base.shape[0], len(tensors), base.shape[1]), dtype=base.dtype, device=base.device)
    for k, t in enumerate(tensors):
        torch.sub(t, base, out=out[:, k])
    return out


def _combiner(expert_weights: Tensor, grams: Sequence[Tensor] | None, cross: Sequence[Tensor] | None,
              off_diagonal_scale: float) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]:
    """``(r, K, n)`` expert stacks -> ``sum_k a_k X_k``, or with Gram matrices of the inputs
    ``(sum_k a_k X_k C_k)(sum_k a_k G_k)^-1`` with ``C_k = G_k``: a weighted mean in which each expert
    counts most along the input directions its own domain uses (RegMean's weighting, solved by
    `regmean_solve`), so at scale 1 the update is RegMean's; equal Grams give the weighted mean.

    With cross Grams ``C_k = X_k^T X~_k`` (``G_k = X~_k^T X~_k``) the layer is the least-squares fit
    of every expert's outputs on the merged model's inputs ``X~_k``; the pivot then needs its own
    correction, returned second: ``W0 -> W0 ((sum_k a_k C_k)(sum_k a_k G_k)^-1 - I)``,
    which is RegMean's solve of K copies of ``W0``, minus ``W0``.
    """
    if grams is None:
        return (lambda x: torch.einsum("rkn,k->rn", x, expert_weights)), None
    for name, given in (("grams", grams), ("cross_grams", cross)):
        if given is not None and len(given) != len(expert_weights):
            raise ValueError(f"{name}: expected {len(expert_weights)} matrices (one per expert), got {len(given)}")
    a = expert_weights.tolist()

    def solve(xs: Sequence[Tensor]) -> Tensor:
        return regmean_solve(xs, grams, a, off_diagonal_scale, cross)

    def combine(x: Tensor) -> Tensor:
        return solve(x.unbind(dim=1))
    if cross is None:
        return combine, None
    return combine, lambda pivot: solve([pivot] * len(a)).sub_(pivot)


def _flattened(m: Tensor) -> Tensor:
    left, sv, right = svd(m)
    return (left * flatten_spectrum(sv, m.shape)) @ right


def _conflict_filter(coef: Tensor, expert_weights: Tensor, combined: Tensor, threshold: float, as_sum: float) -> int:
    """Zero rows of ``combined`` (r, n) where the experts' rows of ``coef`` (r, K, n) cancel;
    ``as_sum`` times ``combined`` is on the scale of the weighted sum (the gram combine is a mean)."""
    mass = (coef.norm(dim=2) * expert_weights.abs()).sum(dim=1)
    agreement = combined.norm(dim=1) * as_sum / mass.clamp_min(torch.finfo(mass.dtype).tiny)
    suppress = (mass > 0) & (1 - agreement > threshold)
    combined[suppress] = 0
    return int(suppress.sum())


def _merge_matrix(tensors: Sequence[Tensor], pivot: Tensor, weights: Sequence[float], params: Params,
                  generator: torch.Generator | None, calibration: Calibration) -> tuple[Tensor, dict[str, Any]]:
    m, n, k = pivot.shape[0], pivot.shape[1], len(tensors)
    deltas = _interleaved_deltas(tensors, pivot)
    flat = deltas.view(m, k * n)
    expert_energy = deltas.square().sum(dim=(0, 2))
    total_energy = float(expert_energy.sum())
    if params.shared_space:
        u, s, vh, choice = low_rank_svd(flat, params.max_rank, params.energy, params.svd, generator)
        u = significant(u, s, vh, flat.shape)[0]
        coef = (u.T @ flat).view(-1, k, n)
        shares = coef.square().sum(dim=(0, 2)) / expert_energy.clamp_min(torch.finfo(flat.dtype).tiny)
    else:
        u, coef, shares, choice = None, deltas, torch.ones(k), None
    expert_weights, score = layer_weights(params, weights, shares, calibration.alignment)
    if params.combine == "covariance":
        merged, info = _covariance_merge(deltas, u, coef, expert_weights, params, generator, score, choice, total_energy)
    else:
        merged, info = _combined_merge(deltas, pivot, u, coef, expert_weights, params, generator, score, choice,
                                       total_energy, calibration)
    if params.layer_weighting == "separation":
        info["layer_score"] = separation(merged, expert_energy)
    return merged, info


def _combined_merge(deltas: Tensor, pivot: Tensor, u: Tensor | None, coef: Tensor, expert_weights: list[float],
                    params: Params, generator: torch.Generator | None, score: float, choice: Any,
                    total_energy: float, calibration: Calibration) -> tuple[Tensor, dict[str, Any]]:
    """The sum and gram combines of the experts' parts (steps 3-6 of the module's docstring)."""
    m, k, n = deltas.shape
    flat = deltas.view(m, k * n)
    a = torch.tensor(expert_weights, dtype=flat.dtype, device=flat.device)
    # Only linear layers' weights have input Gram matrices; other matrices (embeddings, kernels) take the mean below.
    grams = calibration.grams if params.combine == "gram" else None
    own_targets = fits_own_outputs(params.gram_inputs, params.expert_target)
    cross = calibration.cross_grams if grams is not None and own_targets else None
    # The gram combine is a weighted mean, so a matrix without Gram matrices (embeddings) takes the weighted mean
    # too, as RegMean does, not the sum: at the data mode's scale 1 the sum is K times the experts' mean update.
    total = float(a.sum()) if params.combine == "gram" else 1.0
    mean_weights = a if grams is not None or total == 0 else a / total
    combine, pivot_correction = _combiner(mean_weights, grams, cross, params.off_diagonal_scale)
    combined = combine(coef)
    as_sum = total if total else 1.0
    suppressed = _conflict_filter(coef, a, combined, params.conflict_threshold, as_sum) if params.filtering else 0
    if params.spectrum == "flatten":
        combined = _flattened(combined)
    merged = combined if u is None else u @ combined
    if u is not None and params.residual_weight > 0:
        flat.sub_(u @ coef.view(-1, k * n))  # deltas now hold the residuals
        merged.add_(combine(_truncated_residuals(deltas, params, generator)), alpha=params.residual_weight)
    if params.spectrum == "flatten_total":
        merged = _flattened(merged)
    if pivot_correction is not None:  # not an expert's update, so outside the spectrum's treatment
        merged.add_(pivot_correction(pivot))
    kept = 1.0 if total_energy == 0 else float(coef.square().sum()) / total_energy
    info = {"rank": int(coef.shape[0]), "energy_kept": kept, "directions_suppressed": suppressed,
            "combine": "sum" if grams is None else ("gram" if cross is None else "gram (merged inputs)"),
            "expert_weights": expert_weights, "layer_score": score}
    if choice is not None:
        info["shared_svd"] = choice.report()
    return merged, info


def _covariance_merge(deltas: Tensor, u: Tensor | None, coef: Tensor, expert_weights: list[float], params: Params,
                      generator: torch.Generator | None, score: float, choice: Any,
                      total_energy: float) -> tuple[Tensor, dict[str, Any]]:
    """The data-free combine: ACE-Merging's closed form (`ace_update`, its defaults) on each expert's part, its
    shared-space part ``U C_k`` plus ``rho`` times its (truncated) residual (whole ``(m, K, n)`` deltas when the shared
    space is off), so each expert counts most along the input directions its own update uses. Filtering first removes
    the shared directions on which the experts' coefficients cancel, from every expert."""
    a = torch.tensor(expert_weights, dtype=coef.dtype, device=coef.device)
    suppressed = 0
    if params.filtering:
        summed = torch.einsum("rkn,k->rn", coef, a)
        suppressed = _conflict_filter(coef, a, summed, params.conflict_threshold, 1.0)
        kept_rows = summed.abs().sum(dim=1) > 0
    kept_coef = coef * kept_rows[:, None, None] if params.filtering else coef
    parts = kept_coef if u is None else torch.einsum("mr,rkn->mkn", u, kept_coef)  # (m, K, n)
    if u is not None and params.residual_weight > 0:
        residuals = _truncated_residuals(deltas - torch.einsum("mr,rkn->mkn", u, coef), params, generator)
        parts = parts + params.residual_weight * residuals
    merged, heterogeneous = ace_update(parts.transpose(0, 1), expert_weights, AceParams())
    if params.spectrum != "keep":
        merged = _flattened(merged)
    kept = 1.0 if total_energy == 0 else float(coef.square().sum()) / total_energy
    info = {"rank": int(coef.shape[0]), "energy_kept": kept, "directions_suppressed": suppressed, "combine": "covariance",
            "heterogeneous": heterogeneous, "expert_weights": expert_weights, "layer_score": score}
    if choice is not None:
        info["shared_svd"] = choice.report()
    return merged, info


def _truncated_residuals(residuals: Tensor, params: Params, generator: torch.Generator | None) -> Tensor:
    """``(m, K, n)`` residuals, each truncated to ``residual_rank`` if set."""
    if params.residual_rank is None:
        return residuals
    out = torch.empty_like(residuals)
    for k, r in enumerate(residuals.unbind(dim=1)):
        u, s, vh = svd(r, params.residual_rank, params.svd, generator)
        out[:, k] = (u * s) @ vh
    return out


def _merge_vector(tensors: Sequence[Tensor], pivot: Tensor, weights: Sequence[float],
                  params: Params, alignment: Sequence[float] | None) -> tuple[Tensor, dict[str, Any]]:
    deltas = torch.stack([t - pivot for t in tensors])
    mask = elected_mask(deltas * column_weights(weights, deltas))
    # Data-free score of a vector: the share of each expert's mass agreeing with the elected sign.
    mags = deltas.abs().reshape(len(tensors), -1)
    shares = (mags * mask.reshape(len(tensors), -1)).sum(dim=1) / mags.sum(dim=1).clamp_min(torch.finfo(deltas.dtype).tiny)
    expert_weights, score = layer_weights(params, weights, shares, alignment)
    a = column_weights(expert_weights, deltas)
    merged = masked_merge(deltas.mul_(a), a, mask, normalize=True)
    return merged, {"expert_weights": expert_weights, "layer_score": score}


@method("pivotmerge", summary="PivotMerge (our reading): shared-space decomposition, the experts' parts combined in the "
                             "geometry of each layer's inputs (task-vector covariances without data, measured Grams "
                             "with), optional conflict filtering and flattening, layer-wise weights (without data, "
                             "each layer scaled by how far the combine keeps the experts apart; with data, "
                             "optionally fitted to each expert's block outputs).",
        params=Params, base="optional", needs=needs,
        with_calibration=DATA_MODE, fit_block=fit_aligned_block)
def pivotmerge(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
               params: Params, generator: torch.Generator | None = None,
               calibration: Calibration = NO_CALIBRATION) -> Merged:
    pivot = weighted_sum(iter(tensors), [1 / len(tensors)] * len(tensors)) if base is None else base
    if pivot.dim() < 2:
        delta, info = _merge_vector(tensors, pivot, weights, params, calibration.alignment)
    else:
        # Convolution kernels and the like: output channels by everything else.
        as_matrix = [t.reshape(t.shape[0], -1) for t in tensors]
        delta, info = _merge_matrix(as_matrix, pivot.reshape(pivot.shape[0], -1), weights, params, generator, calibration)
        delta = delta.reshape(pivot.shape)
    info["scale"] = scale = _layer_scale(params, info["layer_score"])
    return Merged(onto_base(delta, pivot, scale), info)

