"""DARE (Yu et al. 2024): drop delta entries at random, rescale, then sum or TIES-merge.

Registers ``dare_linear`` and ``dare_ties``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import MethodParams, Tensor, method, per_model
from pivotmerge.methods.toolkit.consensus import consensus_merge
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas, onto_base, stacked_deltas
from pivotmerge.methods.toolkit.sparsify import random_drop_
from pivotmerge.methods.fields import Density, Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("lambda")
    density: Density = Field(1.0, description="Probability of keeping each delta entry (per model).")
    rescale: Literal["inverse_density", "l1", "none"] = Field(
        "inverse_density",
        description="After dropping: divide by density (DARE paper), restore the L1 norm (mergekit's "
                    "rescale: true), or nothing.")
    normalize: bool = Field(
        False, description="dare_linear: divide by the sum of weights; dare_ties: by the agreeing weights.")


def _dropped(tensors: Sequence[Tensor], base: Tensor, params: Params, generator: torch.Generator | None):
    for t, density in zip(tensors, per_model(params.density, len(tensors), "density")):
        yield random_drop_(t - base, density, generator, params.rescale)


@method("dare_linear", summary="Randomly drop delta entries (keep with probability density), rescale, weighted sum.",
        params=Params)
def dare_linear(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None
    return add_weighted_deltas(base, _dropped(tensors, base, params, generator), weights, params.scale,
                               params.normalize)


@method("dare_ties", summary="Randomly drop delta entries, rescale, then TIES sign election and disjoint mean.",
        params=Params)
def dare_ties(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
              params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None
    deltas = stacked_deltas(tensors, base)
    for d, density in zip(deltas, per_model(params.density, len(tensors), "density")):
        random_drop_(d, density, generator, params.rescale)
    return onto_base(consensus_merge(deltas, weights, params.normalize), base, params.scale)
