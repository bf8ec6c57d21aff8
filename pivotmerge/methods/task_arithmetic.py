"""Task arithmetic (Ilharco et al. 2023): add the weighted task vectors to the base."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Method, Tensor, register
from pivotmerge.methods._ops import normalize_by_weight_sum, weighted_sum
from pivotmerge.methods.fields import LambdaParams, scale


class Params(LambdaParams):
    normalize: bool = Field(False, description="Divide the summed delta by the sum of the weights (mergekit's default: false).")


def task_arithmetic(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                    params: Params, generator: torch.Generator | None = None) -> Tensor:
    assert base is not None  # the registry marks base as required
    delta = weighted_sum((t - base for t in tensors), weights)
    if params.normalize:
        normalize_by_weight_sum(delta, weights)
    return delta.mul_(scale(params)).add_(base)


METHOD = register(Method(
    name="task_arithmetic",
    summary="W0 + lambda * sum_k w_k (W_k - W0).",
    params=Params,
    merge=task_arithmetic,
    elementwise=True,
))
