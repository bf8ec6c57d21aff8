"""DARE (Yu et al. 2024): drop delta entries at random, rescale, then sum or TIES-merge.

Registers ``dare_linear`` and ``dare_ties``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Method, Tensor, per_model, register
from pivotmerge.methods._ops import consensus_merge, normalize_by_weight_sum, random_drop_, stacked_deltas, weighted_sum
from pivotmerge.methods.fields import LambdaParams, PerModel, scale


class Params(LambdaParams):
    density: PerModel = Field(1.0, description="Probability of keeping each delta entry (per model).")
    rescale: Literal["inverse_density", "l1", "none"] = Field(
        "inverse_density",
        description="After dropping: divide by density (DARE paper), restore the L1 norm (mergekit's rescale: true), or nothing.")
    normalize: bool = Field(False, description="dare_linear: divide by the sum of weights; dare_ties: by the agreeing weights.")


def _dropped(tensors: Sequence[Tensor], base: Tensor, params: Params, generator: torch.Generator | None):
    for t, density in zip(tensors, per_model(params.density, len(tensors), "density")):
        yield random_drop_(t - base, density, generator, params.rescale)


def dare_linear(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None
    delta = weighted_sum(_dropped(tensors, base, params, generator), weights)
    if params.normalize:
        normalize_by_weight_sum(delta, weights)
    return delta.mul_(scale(params)).add_(base)


def dare_ties(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
              params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None
    deltas = stacked_deltas(tensors, base)
    for d, density in zip(deltas, per_model(params.density, len(tensors), "density")):
        random_drop_(d, density, generator, params.rescale)
    merged = consensus_merge(deltas, weights, params.normalize)
    return merged.mul_(scale(params)).add_(base)


LINEAR = register(Method(
    name="dare_linear",
    summary="Randomly drop delta entries (keep with probability density), rescale, weighted sum.",
    params=Params,
    merge=dare_linear,
    per_model=("density",),
))

TIES = register(Method(
    name="dare_ties",
    summary="Randomly drop delta entries, rescale, then TIES sign election and disjoint mean.",
    params=Params,
    merge=dare_ties,
    per_model=("density",),
))
