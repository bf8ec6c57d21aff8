"""RegMean (Jin et al., 2023): the linear map closest to every expert on its own inputs.

For a linear layer ``y = x W^T`` (``W`` is ``out x in``, nn.Linear's layout) and
expert ``k`` with Gram matrix ``G_k = X_k^T X_k`` of its layer inputs,

    W = (sum_k w_k W_k G~_k) (sum_k w_k G~_k)^-1,   G~_k = alpha G_k + (1 - alpha) diag(G_k),

which minimises ``sum_k w_k ||X_k W^T - X_k W_k^T||^2`` (with the off-diagonal
entries shrunk by ``alpha``, which keeps the solve well conditioned). Tensors
without Gram matrices (biases, norms, embeddings) take the weighted mean, as
in the paper. The engine fills ``grams`` from the spec's calibration data.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import Field, field_validator

from . import Merged, Method, MethodParams, Tensor, register
from .linear import Params as LinearParams
from .linear import linear


class Params(MethodParams):
    alpha: float = Field(0.9, ge=0, le=1, description="Scale of the Gram matrices' off-diagonal entries (1: plain RegMean; 0: diagonal only).")
    grams: list[Any] | None = Field(None, exclude=True, description="Per-expert Gram matrices of this layer's inputs; set by the engine from calibration data, never in a spec.")

    @field_validator("grams")
    @classmethod
    def _tensors(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and not all(isinstance(g, torch.Tensor) and g.ndim == 2 for g in v):
            raise ValueError("grams: set by the engine from `calibration` data, not in a spec")
        return v


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``alpha G + (1 - alpha) diag(G)``."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], scales: Sequence[float], alpha: float) -> Tensor:
    """The RegMean closed form for ``out x in`` weights and ``in x in`` Grams, solved in float64."""
    if len(weights) != len(grams) or len(scales) != len(weights):
        raise ValueError(f"regmean: {len(weights)} weights, {len(grams)} Gram matrices and {len(scales)} scales")
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)  # sum_k w_k G~_k          (in x in)
    rhs = torch.zeros_like(weights[0], dtype=torch.float64)  # sum_k w_k W_k G~_k   (out x in)
    for w, g, s in zip(weights, grams, scales):
        if g.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"regmean: Gram matrix {list(g.shape)} does not fit a weight {list(w.shape)}")
        g = shrink_off_diagonal(g.to(device=lhs.device, dtype=torch.float64), alpha) * s
        lhs += g
        rhs += w.to(torch.float64) @ g
    # W lhs = rhs with lhs symmetric, so W^T = lhs^-1 rhs^T; pinv covers inputs that never vary.
    try:
        merged_t = torch.linalg.solve(lhs, rhs.T)
    except torch.linalg.LinAlgError:
        merged_t = torch.linalg.pinv(lhs, hermitian=True) @ rhs.T
    return merged_t.T.to(weights[0].dtype)


def regmean(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
            params: Params, generator: torch.Generator | None = None) -> Merged:
    if params.grams is None or tensors[0].ndim != 2:
        return Merged(linear(tensors, None, weights, LinearParams()), {"regmean": False})
    if len(params.grams) != len(tensors):
        raise ValueError(f"grams: expected {len(tensors)} Gram matrices (one per expert), got {len(params.grams)}")
    return Merged(regmean_solve(tensors, params.grams, weights, params.alpha), {"regmean": True})


METHOD = register(Method(
    name="regmean",
    summary="RegMean: per linear layer, (sum_k W_k G_k)(sum_k G_k)^-1 with Gram matrices of its inputs on calibration data.",
    params=Params,
    merge=regmean,
    base="unused",
    engine_params=("grams",),
))
