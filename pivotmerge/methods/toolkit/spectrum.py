"""Singular spectra: which values are numerically nonzero, how many hold an energy share, Iso-C's flattening."""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def nonzero_singular(s: Tensor, shape: Sequence[int]) -> Tensor:
    """Mask of singular values above ``max(shape) * eps * s_max`` (numpy's matrix_rank rule)."""
    if s.numel() == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > max(shape) * torch.finfo(s.dtype).eps * s.max()


def significant(u: Tensor, s: Tensor, vh: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Drop SVD directions at numerical zero before singular vectors are orthogonalised
    together: their vectors are arbitrary and would rotate the real ones."""
    keep = nonzero_singular(s, shape)
    return u[:, keep], s[keep], vh[keep]


def flatten_spectrum(s: Tensor, shape: Sequence[int]) -> Tensor:
    """Iso-C's isotropic spectrum: every nonzero singular value replaced by their mean.

    ``s`` need not be sorted. Directions at numerical zero stay zero: their
    singular vectors are arbitrary, so lifting them to the mean would add noise.
    """
    keep = nonzero_singular(s, shape)
    if not keep.any():
        return torch.zeros_like(s)
    return torch.where(keep, s[keep].mean(), 0.0)


def energy_rank(s: Tensor, energy: float, total: float | None = None) -> int:
    """Fewest leading singular values whose squared sum reaches ``energy`` of ``total``.

    ``total`` defaults to ``sum(s**2)``; pass ``||A||_F^2`` when ``s`` is truncated.
    """
    sq = s.double().square()
    total = float(sq.sum()) if total is None else total
    if total <= 0 or s.numel() == 0:
        return 0
    reached = (sq.cumsum(0) >= energy * total * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if reached.numel() else s.numel()
