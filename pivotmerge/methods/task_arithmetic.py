"""Task arithmetic (Ilharco et al. 2023): add the weighted task vectors to the base."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from pivotmerge.methods import MethodParams, Tensor, method
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas
from pivotmerge.methods.fields import Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("lambda")
    normalize: bool = Field(
        False, description="Divide the summed delta by the sum of the weights (mergekit's default: false).")


@method("task_arithmetic", summary="W0 + scale * sum_k w_k (W_k - W0).", params=Params, execution="elementwise")
def task_arithmetic(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                    params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None  # the registry marks base as required
    return add_weighted_deltas(base, (t - base for t in tensors), weights, params.scale, params.normalize)
