"""Task deltas ``d_k = W_k - W0`` and their weighted sums: how update-merging methods start and end.

Deltas are stacked as one ``(K, *shape)`` tensor only where a method needs all
experts at once (sign election, SVD of the concatenation); otherwise they are
formed one at a time and accumulated, so peak memory stays near two tensors.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

Tensor = torch.Tensor


def stacked_deltas(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """``(K, *shape)`` tensor of ``W_k - W0``, written into one allocation."""
    out = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for k, t in enumerate(tensors):
        torch.sub(t, base, out=out[k])
    return out


def weighted_sum(deltas: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k w_k d_k`` accumulated in place; ``deltas`` may be a lazy generator."""
    acc: Tensor | None = None
    for d, w in zip(deltas, weights):
        if acc is None:
            acc = d * w
        else:
            acc.add_(d, alpha=w)
    if acc is None:
        raise ValueError("no tensors to merge")
    return acc


def onto_base(delta: Tensor, base: Tensor, scale: float) -> Tensor:
    """``W0 + scale * delta``, written into ``delta``: how every update-merging method ends."""
    return delta.mul_(scale).add_(base)


def add_weighted_deltas(base: Tensor, deltas: Iterable[Tensor], weights: Sequence[float], scale: float,
                        normalize: bool = False) -> Tensor:
    """Task arithmetic, ``W0 + scale * sum_k w_k d_k`` (over ``sum_k w_k`` when ``normalize``);
    ``deltas`` may be a lazy generator (``t - base for t in tensors``), so one is formed at a time."""
    delta = weighted_sum(deltas, weights)
    if normalize:
        normalize_by_weight_sum(delta, weights)
    return onto_base(delta, base, scale)


def column_weights(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights shaped ``(K, 1, ..., 1)`` to broadcast against a ``(K, *shape)`` stack."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.dim() - 1)))


def normalize_by_weight_sum(merged: Tensor, weights: Sequence[float]) -> Tensor:
    """Divide by ``sum_k w_k`` (a sum too close to zero divides by 1, as in mergekit)."""
    total = float(sum(weights))
    return merged if abs(total) < 1e-8 else merged.div_(total)
