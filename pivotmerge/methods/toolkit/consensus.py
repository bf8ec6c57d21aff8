"""TIES' consensus: sign election over the experts' weighted deltas and their disjoint merge."""

from __future__ import annotations

from typing import Sequence

import torch

from pivotmerge.methods.toolkit.deltas import column_weights

Tensor = torch.Tensor


def elected_mask(weighted: Tensor) -> Tensor:
    """TIES sign election on a ``(K, *shape)`` stack of weighted deltas.

    The elected sign is that of the summed mass (``+`` on a zero sum, as in
    mergekit); an entry takes part when its sign equals it, so zeros never do.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    # sign(x) == e for e = +-1 is x * e > 0 (zeros and NaNs take no part either way),
    # one expert at a time: no (K, *shape) float temporaries.
    mask = torch.empty(weighted.shape, dtype=torch.bool, device=weighted.device)
    for k, d in enumerate(weighted):
        torch.gt(d * elected, 0, out=mask[k])
    return mask


def masked_merge(weighted: Tensor, w: Tensor, mask: Tensor, normalize: bool) -> Tensor:
    """Disjoint merge ``sum_k w_k d_k m_k / sum_k w_k m_k`` of weighted deltas ``w_k d_k``.

    ``w`` is shaped by ``column_weights``. Without ``normalize`` the division is
    skipped; entries no expert takes part in divide by 1, as in mergekit.
    """
    # Accumulated one expert at a time, without sum(dim=0)'s (K, *shape) product
    # temporaries: the same bits for up to four experts; from five on, torch's
    # vectorised sum groups the terms differently (last-bit differences).
    merged = weighted[0] * mask[0]
    for d, m in zip(weighted[1:], mask[1:]):
        merged.addcmul_(d, m)
    if normalize:
        divisor = w[0] * mask[0]
        for wk, m in zip(w[1:], mask[1:]):
            divisor.addcmul_(wk, m)
        divisor[divisor == 0] = 1
        merged.div_(divisor)
    return merged


def consensus_merge(deltas: Tensor, weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES election and disjoint merge of a ``(K, *shape)`` stack, overwriting ``deltas``."""
    w = column_weights(weights, deltas)
    weighted = deltas.mul_(w)
    return masked_merge(weighted, w, elected_mask(weighted), normalize)
