"""Weighted average of the models ("model soup")."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from pivotmerge.methods import MethodParams, Tensor, method


class Params(MethodParams):
    normalize: bool = Field(True, description="Divide by the sum of the weights.")


@method("linear", summary="Weighted average of the models: sum_k w_k W_k / sum_k w_k.", params=Params, base="unused",
        execution="elementwise")
def linear(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
           params: Params, generator: torch.Generator | None = None) -> Tensor:
    w = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device)
    out = torch.einsum("k,k...->...", w, torch.stack(list(tensors)))
    if params.normalize:
        out = out / w.sum()
    return out
