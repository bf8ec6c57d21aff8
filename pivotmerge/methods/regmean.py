"""RegMean (Jin et al., 2023): the linear map closest to every expert on its own inputs.

For a linear layer ``y = x W^T`` (``W`` is ``out x in``, nn.Linear's layout) and
expert ``k`` with Gram matrix ``G_k = X_k^T X_k`` of its layer inputs,

    W = (sum_k w_k W_k G~_k) (sum_k w_k G~_k)^-1,   G~_k = alpha G_k + (1 - alpha) diag(G_k),

which minimises ``sum_k w_k ||X_k W^T - X_k W_k^T||^2`` (with the off-diagonal
entries scaled by ``alpha``, the ``off_diagonal_scale``, which keeps the solve well conditioned). Tensors
without Gram matrices (biases, norms, embeddings) take the weighted mean, as
in the paper. The engine measures the Gram matrices on the spec's calibration data.

``gram_inputs: merged`` is RegMean++ (Nguyen et al., 2025): the layer is fitted on
the inputs ``X~_k`` the merged model feeds it (block after block), ``G_k = X~_k^T X~_k``. As
published (``expert_target: merged_inputs``) each expert's weights are matched on those inputs,
``min sum_k w_k ||X~_k W^T - X~_k W_k^T||^2``, RegMean's formula on the new Grams; with
``expert_target: own_inputs`` (this project's variant, the one it shipped as RegMean++ before)
each expert's outputs on its own inputs, ``min sum_k w_k ||X~_k W^T - X_k W_k^T||^2``, so
``W = (sum_k w_k W_k C~_k)(sum_k w_k G~_k)^-1`` with the cross Gram ``C_k = X_k^T X~_k``
(``C~_k = alpha C_k + (1 - alpha) diag(G_k)``). The engine measures both in a first merge pass.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import NO_CALIBRATION, Calibration, Merged, MethodParams, Need, Tensor, method
from pivotmerge.methods.fields import (ExpertTarget, OffDiagonalScale, expert_target_field, fits_own_outputs,
                                      merged_input_needs, off_diagonal_scale_field)
from pivotmerge.methods.linear import Params as LinearParams
from pivotmerge.methods.linear import linear


class Params(MethodParams):
    off_diagonal_scale: OffDiagonalScale = off_diagonal_scale_field("alpha")
    gram_inputs: Literal["expert", "merged"] = Field(
        "expert", description="expert: fit each layer on each expert's own inputs (RegMean); merged: on the inputs "
                              "the merged model feeds it, so each layer corrects what the merged layers before it "
                              "changed (RegMean++; the engine merges twice).")
    expert_target: ExpertTarget = expert_target_field()


def needs(params: Params) -> set[Need]:
    return merged_input_needs(params.gram_inputs, params.expert_target)


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``alpha G + (1 - alpha) diag(G)``."""
    return shrink_cross(gram, gram, alpha)


def shrink_cross(cross: Tensor, gram: Tensor, alpha: float) -> Tensor:
    """``alpha C + (1 - alpha) diag(G)``: a cross Gram shrunk like its Gram, so ``C = G`` gives ``G~``."""
    return alpha * cross + (1 - alpha) * torch.diag_embed(torch.diagonal(gram))


def regmean_solve(weights: Sequence[Tensor], grams: Sequence[Tensor], scales: Sequence[float], alpha: float,
                  cross_grams: Sequence[Tensor] | None = None) -> Tensor:
    """The RegMean closed form for ``out x in`` weights and ``in x in`` Grams, solved in float64;
    with `cross_grams` (``X_k^T X~_k``, Grams then of the merged inputs ``X~_k``) RegMean++'s."""
    if (len(weights) != len(grams) or len(scales) != len(weights)
            or (cross_grams is not None and len(cross_grams) != len(grams))):
        raise ValueError(f"regmean: {len(weights)} weights, {len(grams)} Gram matrices"
                         f"{'' if cross_grams is None else f', {len(cross_grams)} cross Gram matrices'}"
                         f" and {len(scales)} scales")
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)  # sum_k w_k G~_k          (in x in)
    rhs = torch.zeros_like(weights[0], dtype=torch.float64)  # sum_k w_k W_k C~_k   (out x in)
    for k, (w, g, s) in enumerate(zip(weights, grams, scales)):
        if g.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"regmean: Gram matrix {list(g.shape)} does not fit a weight {list(w.shape)}")
        g = g.to(device=lhs.device, dtype=torch.float64)
        c = g if cross_grams is None else cross_grams[k].to(device=lhs.device, dtype=torch.float64)
        lhs += shrink_off_diagonal(g, alpha) * s
        rhs += w.to(torch.float64) @ (shrink_cross(c, g, alpha) * s)
    # W lhs = rhs with lhs symmetric, so W^T = lhs^-1 rhs^T; pinv covers inputs that never vary.
    try:
        merged_t = torch.linalg.solve(lhs, rhs.T)
    except torch.linalg.LinAlgError:
        merged_t = torch.linalg.pinv(lhs, hermitian=True) @ rhs.T
    return merged_t.T.to(weights[0].dtype)


@method("regmean", summary="RegMean: per linear layer, (sum_k W_k G_k)(sum_k G_k)^-1 with Gram matrices of its "
                           "inputs on calibration data (gram_inputs: merged: RegMean++, fitted on the merged model's "
                           "inputs).",
        params=Params, base="unused", needs=needs)
def regmean(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
            params: Params, generator: torch.Generator | None = None,
            calibration: Calibration = NO_CALIBRATION) -> Merged:
    if calibration.grams is None or tensors[0].ndim != 2:
        return Merged(linear(tensors, None, weights, LinearParams()), {"regmean": False})
    if len(calibration.grams) != len(tensors):
        raise ValueError(f"grams: expected {len(tensors)} Gram matrices (one per expert), got {len(calibration.grams)}")
    merged_inputs = params.gram_inputs == "merged"
    cross = calibration.cross_grams if fits_own_outputs(params.gram_inputs, params.expert_target) else None
    return Merged(regmean_solve(tensors, calibration.grams, weights, params.off_diagonal_scale, cross),
                  {"regmean": True, "inputs": "merged" if merged_inputs else "expert"})
