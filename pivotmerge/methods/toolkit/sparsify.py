"""Sparsifying a delta: TIES' magnitude trim (exact, piece by piece) and DARE's random drop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable, Literal

import torch

from pivotmerge.methods.toolkit.pieces import flat_pieces

Tensor = torch.Tensor


# The bits of a non-negative float32 read as an int32 order like its value, so the
# k-th largest magnitude is found exactly from two histograms: of the top 16 bits,
# then of the low 16 bits inside the top bin that holds it. Each pass reads the
# delta piece by piece: no full-size copy, O(n), and faster than torch.kthvalue.
_HIGH_BINS = 1 << 15  # magnitudes have the sign bit clear
_LOW_BINS = 1 << 16


def _magnitude_bits(d: Tensor) -> Tensor:
    return d.abs().view(torch.int32)


def _top_bin(counts: Tensor, k: int) -> tuple[int, int]:
    """The highest bin ``b`` with at least ``k`` counts in bins ``>= b``, and the counts above ``b``."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= k).sum()) - 1
    return b, int(at_or_above[b + 1]) if b + 1 < counts.numel() else 0


def kth_largest_magnitude(delta: Callable[[slice], Tensor], n: int, k: int) -> tuple[float, int]:
    """The ``k``-th largest ``|d|`` of ``n`` entries read as ``delta(piece)``, and how many exceed it."""
    high = reduce(torch.add, (torch.bincount(_magnitude_bits(delta(p)) >> 16, minlength=_HIGH_BINS)
                              for p in flat_pieces(n)))
    top, above = _top_bin(high, k)
    low = reduce(torch.add, (torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=_LOW_BINS)
                             for bits in (_magnitude_bits(delta(p)) for p in flat_pieces(n))))
    bottom, above_in_bin = _top_bin(low, k - above)
    threshold = torch.tensor(top << 16 | bottom, dtype=torch.int32).view(torch.float32).item()
    return threshold, above + above_in_bin


@dataclass
class MagnitudeCut:
    """Which entries of one delta TIES keeps: every one, none, or the ``|d| > threshold``
    plus the first ``ties`` entries at ``|d| == threshold`` in flat-index order.

    ``apply_`` takes the delta's pieces in flat order and counts down ``ties``
    across them, so a piecewise trim keeps exactly the whole-tensor set.
    """

    keep: Literal["all", "none", "top"]
    threshold: float = 0.0
    ties: int = 0

    def apply_(self, d: Tensor) -> Tensor:
        """Trim ``d``, the next piece of the delta (or all of it), in place."""
        if self.keep == "all":
            return d
        if self.keep == "none":
            return d.zero_()
        mag = d.reshape(-1).abs()
        keep = mag > self.threshold
        if self.ties:
            tied = (mag == self.threshold).nonzero().squeeze(1)[: self.ties]
            keep[tied] = True
            self.ties -= tied.numel()
        return d.mul_(keep.reshape(d.shape))


def magnitude_cut(delta: Callable[[slice], Tensor], n: int, density: float) -> MagnitudeCut:
    """TIES' trim of a delta of ``n`` entries read as ``delta(piece)``: its
    ``max(1, int(density * n))`` largest ``|d|``.

    The count matches mergekit's ``magnitude``; entries tied at the threshold are
    kept in flat-index order (mergekit's argsort leaves that order unspecified).
    """
    if density >= 1:
        return MagnitudeCut("all")
    if density <= 0 or n == 0:
        return MagnitudeCut("none")
    k = max(1, int(density * n))
    threshold, above = kth_largest_magnitude(delta, n, k)
    return MagnitudeCut("top", threshold, k - above)


def magnitude_trim_(d: Tensor, density: float) -> Tensor:
    """Keep the ``max(1, int(density * numel))`` largest ``|d|`` entries, zero the rest, in place."""
    flat = d.reshape(-1)
    return magnitude_cut(flat.__getitem__, flat.numel(), density).apply_(d)


def random_drop_(d: Tensor, density: float, generator: torch.Generator | None,
                 rescale: Literal["inverse_density", "l1", "none"]) -> Tensor:
    """DARE: keep each entry with probability ``density``, then rescale, in place.

    ``inverse_density`` divides by ``density`` (the DARE paper); ``l1`` restores the
    L1 norm of ``d`` as mergekit's ``rescale: true`` does.
    """
    if density >= 1:
        return d
    if density <= 0:
        return d.zero_()
    l1_before = d.abs().sum() if rescale == "l1" else None
    # A uniform draw below `density` is a Bernoulli(density) draw; torch draws uniforms
    # vectorised, much faster than `bernoulli_` on CPU (docs/performance.md).
    d.mul_(torch.rand(d.shape, generator=generator, dtype=d.dtype, device=d.device) < density)
    if rescale == "inverse_density":
        d.div_(density)
    elif l1_before is not None:
        l1_after = d.abs().sum()
        # Like mergekit: leave near-empty results unscaled instead of blowing them up.
        if l1_before >= 1e-7 and l1_after >= 1e-7:
            d.mul_(l1_before / l1_after)
    return d
