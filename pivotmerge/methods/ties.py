"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from . import Method, Tensor, per_model, register
from ._ops import consensus_merge, magnitude_trim_, stacked_deltas
from ._params import LambdaParams, PerModel, scale


class Params(LambdaParams):
    density: PerModel = Field(1.0, description="Fraction of each expert's delta kept, by magnitude (per model).")
    normalize: bool = Field(True, description="Divide by the summed weights of the agreeing experts (disjoint mean).")


def ties(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
         params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None
    deltas = stacked_deltas(tensors, base)
    for d, density in zip(deltas, per_model(params.density, len(tensors), "density")):
        magnitude_trim_(d, density)
    merged = consensus_merge(deltas, weights, params.normalize)
    return merged.mul_(scale(params)).add_(base)


METHOD = register(Method(
    name="ties",
    summary="Trim each delta to its top-density magnitudes, elect signs by mass, average the agreeing entries.",
    params=Params,
    merge=ties,
    per_model=("density",),
))
