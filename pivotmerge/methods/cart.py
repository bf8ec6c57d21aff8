"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging"): the average plus low-rank residuals.

Centred at the experts' average ``W_avg = sum_k w_k W_k / sum_k w_k`` instead of the base, each
expert's residual ``W_k - W_avg`` of a 2-D weight keeps its top ``r = max(1, int(rank_ratio * min(m, n)))``
singular directions (``rank_ratio`` 0: none; 1: all), and

    W = W_avg + prior * sum_k w_k LowRank_r(W_k - W_avg),

as ``_merge_weights("CART")`` in the authors' ``src/merging.py`` (JH-GEECS/CART), whose 8-task
configuration sets ``prior: 2.0`` and ``initial_rank_ratio: 0.12``. Other tensors take the average
(there the residuals, kept whole, sum to zero). No base: the average is the centre.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Merged, MethodParams, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import column_weights, weighted_sum
from pivotmerge.methods.toolkit.svd import exact_svd


class Params(MethodParams):
    prior: Annotated[float, Search(0.0, 4.0)] = Field(
        2.0, ge=0, description="Scale of the summed low-rank residuals (the authors' `prior`; 0: the plain average).")
    rank_ratio: Annotated[float, Search(0.02, 0.5, log=True)] = Field(
        0.12, ge=0, le=1, description="Share of min(m, n) singular directions kept of each residual (the authors' "
                                      "`initial_rank_ratio`; at least one unless 0).")


def cart_rank(shape: Sequence[int], ratio: float) -> int:
    """The authors' rank rule: none at 0, all at 1, else ``max(1, int(ratio * min(m, n)))``."""
    full = min(shape)
    return 0 if ratio == 0 else full if ratio == 1 else max(1, int(ratio * full))


@method("cart", summary="CART: the experts' average plus each expert's low-rank residual around it, scaled by `prior`.",
        params=Params, base="unused")
def cart(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
         params: Params, generator: torch.Generator | None = None) -> Merged:
    stack = torch.stack(list(tensors))
    total = float(sum(weights))
    average = weighted_sum(stack.unbind(0), [w / total for w in weights])
    rank = cart_rank(average.shape, params.rank_ratio) if average.dim() == 2 else 0
    if rank == 0:
        return Merged(average, {"rank": 0})
    u, s, vh = exact_svd(stack - average)  # one batched SVD of the K residuals
    low_rank = (u[..., :rank] * s[:, None, :rank]) @ vh[:, :rank]
    residual = (low_rank * column_weights(weights, low_rank)).sum(dim=0)
    return Merged(average.add_(residual, alpha=params.prior), {"rank": rank})
