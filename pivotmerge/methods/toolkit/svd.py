"""Truncated SVDs routed by cost: LAPACK, the float64 Gram route, or a seeded randomized sketch
(Halko et al. 2011), with the choice and its estimated error recorded for the merge report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from pivotmerge.methods.toolkit.spectrum import energy_rank

Tensor = torch.Tensor
SvdMode = Literal["exact", "randomized", "auto"]


# Power iterations of the fixed-rank randomized range finder (`svd`): two are enough
# for the slowly decaying spectra of fine-tuning updates (Halko et al. 2011, sec. 4.5).
# `low_rank_svd` takes one, then one more to estimate its error.
_POWER_ITERATIONS = 2
_OVERSAMPLE = 8


def svd(a: Tensor, rank: int | None = None, mode: SvdMode = "exact",
        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``a = U diag(S) Vh`` in float32, truncated to ``rank`` when given.

    ``randomized`` uses a seeded range finder (Halko et al.) and needs ``rank``;
    ``auto`` takes it where it is much cheaper than an exact SVD (`sketch_pays`).
    A rank above ``min(a.shape)`` is capped.
    """
    a = a.float()
    full = min(a.shape)
    rank = full if rank is None else max(0, min(rank, full))
    if mode == "randomized" and rank + _OVERSAMPLE < full or mode == "auto" and sketch_pays(a.shape, rank):
        sketch = _Sketch(a, rank + _OVERSAMPLE, generator)
        for _ in range(_POWER_ITERATIONS):
            sketch = sketch.refined()
        u, s, vh = sketch.svd()
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, vh = exact_svd(a)
    return u[:, :rank], s[:rank], vh[:rank]


# Below this smaller side LAPACK's SVD is cheap and `auto` always takes it. Above it,
# an exact SVD is the eigendecomposition of the float64 Gram matrix: two (m, n) x (n, n)
# products and an (n, n) eigh, several times faster than LAPACK's gesdd on one core
# (figures in docs/performance.md).
EXACT_LAPACK_SIDE = 256
# auto sketches only when the sketch is at most this share of the smaller side:
# beyond it the range finder's products and QRs cost about as much as the Gram route.
SKETCH_SHARE = 1 / 8
# What the randomized SVD may differ from the exact one at the chosen rank, as a
# share of the kept part's norm, before `low_rank_svd` falls back to exact.
SVD_TOLERANCE = 0.01


def sketch_pays(shape: Sequence[int], rank: int) -> bool:
    """Whether a randomized sketch of ``rank`` directions is much cheaper than an exact SVD."""
    side = min(shape[-2:])
    return side > EXACT_LAPACK_SIDE and rank + _OVERSAMPLE <= side * SKETCH_SHARE


def exact_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``a`` (or of a batch ``(B, m, n)``), float32 results, descending values.

    Small matrices go to LAPACK; larger ones through the float64 Gram matrix, whose
    eigenvalues carry ``s_i**2`` to float64 precision (so ``s_i`` to about
    ``1e-8 * s_max``, below float32's own rounding); directions below
    ``max(m, n) * 1.5e-8 * s_max`` get zero singular vectors, which every caller drops or
    scales by zero (`nonzero_singular`'s float32 rule already counts them as zero).
    """
    a = a.float()
    if min(a.shape[-2:]) <= EXACT_LAPACK_SIDE:
        return torch.linalg.svd(a, full_matrices=False)
    wide = a.shape[-2] < a.shape[-1]
    x = (a.mT if wide else a).double()
    evals, v = torch.linalg.eigh(x.mT @ x)
    s = evals.flip(-1).clamp_min(0).sqrt()
    v = v.flip(-1)
    # Below this, s_i carries no float64 digits of the Gram matrix: zero vectors, not x v / s blown up.
    floor = max(a.shape[-2:]) * torch.finfo(torch.float64).eps ** 0.5 * s[..., :1]
    u = (x @ v).mul_(torch.where(s > floor, 1 / s, 0).unsqueeze(-2))
    u, s, v = u.float(), s.float(), v.float()
    return (v, s, u.mT) if wide else (u, s, v.mT)


class _Sketch:
    """Halko et al.'s randomized range finder on ``a`` (or a ``(B, m, n)`` batch).

    Works on the short side: a tall matrix is sketched as its transpose (a view), so
    the orthonormal basis is ``(short side, width)`` and every QR is small; the only
    products with ``a`` are two per power iteration (32000 x 1024 embeddings: the
    tall QRs of the textbook form cost as much as the products). ``rows = basis^T x``
    is kept, as the next iteration and the final SVD both start from it.
    """

    def __init__(self, a: Tensor, width: int, generator: torch.Generator | None, basis: Tensor | None = None) -> None:
        self.a = a
        self.flipped = a.shape[-2] > a.shape[-1]
        x = a.mT if self.flipped else a
        if basis is None:
            omega = torch.randn(*x.shape[:-2], x.shape[-1], width, generator=generator, dtype=a.dtype, device=a.device)
            basis = torch.linalg.qr(x @ omega).Q
        self.basis = basis
        self.rows = basis.mT @ x

    def refined(self) -> "_Sketch":
        """One power iteration: the range of ``x x^T basis``."""
        x = self.a.mT if self.flipped else self.a
        return _Sketch(self.a, 0, None, torch.linalg.qr(x @ self.rows.mT).Q)

    def values(self) -> Tensor:
        """Singular values of the sketch, ``(..., width)``, descending."""
        return torch.linalg.svdvals(self.rows)

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of ``basis basis^T x`` (the exact SVD of the small ``rows``, lifted back), as of ``a``."""
        u, s, vh = torch.linalg.svd(self.rows, full_matrices=False)
        u = self.basis @ u
        return (vh.mT, s, u.mT) if self.flipped else (u, s, vh)


@dataclass(frozen=True)
class SvdChoice:
    """How one matrix's truncated SVD was taken, for the merge report.

    ``rank``: directions kept (the energy rule's, capped by the method's rank);
    ``energy``: their share of the matrix's squared Frobenius norm; ``error``: for a
    randomized SVD, the estimated relative difference from the exact SVD at this rank
    (`low_rank_svd`), 0 for an exact one.
    """

    svd: Literal["exact", "randomized"]
    rank: int
    energy: float
    error: float = 0.0

    def report(self) -> dict[str, float | int | str]:
        return {"svd": self.svd, "rank": self.rank, "energy": round(self.energy, 6),
                "error": float(f"{self.error:.3g}")}


LowRank = tuple[Tensor, Tensor, Tensor, SvdChoice]


def low_rank_svd(a: Tensor, cap: int | None, energy: float = 1.0, mode: SvdMode = "auto",
                 generator: torch.Generator | None = None, tol: float = SVD_TOLERANCE) -> LowRank:
    """Top singular directions of ``a`` chosen by the rank rule, and how they were found.

    Rank rule: the fewest directions holding ``energy`` of ``||a||_F^2``, at most ``cap``
    (None: no cap). ``exact`` takes an exact SVD. ``randomized`` and ``auto`` sketch the
    range with ``rank + oversampling`` columns (oversampling ``max(8, rank / 4)``) and one
    power iteration, doubling the sketch until the rule's rank fits inside it; then run a
    second power iteration and estimate the error from what it added: the kept directions'
    energy rises by ``dE`` (the range finder converges geometrically, so what is still
    missing is at most about ``dE``), and ``sqrt(dE / E_kept)`` estimates the difference
    from the exact SVD relative to the kept part (float32 rounding puts a floor of about
    ``3e-4`` under it). ``auto`` falls back to the exact SVD when
    that estimate exceeds ``tol`` or the sketch stops paying (`sketch_pays`); ``randomized``
    always returns the sketch (its error recorded).
    """
    return low_rank_svds(a.unsqueeze(0), cap, energy, mode, generator, tol)[0]


def low_rank_svds(mats: Tensor, cap: int | None, energy: float = 1.0, mode: SvdMode = "auto",
                  generator: torch.Generator | None = None, tol: float = SVD_TOLERANCE) -> list[LowRank]:
    """`low_rank_svd` of each of a ``(B, m, n)`` batch of same-shaped matrices, sketched together
    (one batched product per step instead of B small ones)."""
    mats = mats.float()
    full = min(mats.shape[-2:])
    cap = full if cap is None else max(0, min(cap, full))
    # Row norms, then a float64 sum: one float32 norm over the 98M entries of a (32000, 3 x 1024)
    # stack came out 1.9% low (float32 accumulation), which moves the rank rule.
    totals = torch.linalg.vector_norm(mats, dim=-1).double().square().sum(dim=-1)
    if mode == "exact" or (mode == "auto" and not sketch_pays(mats.shape, min(cap, _FIRST_SKETCH))):
        return [_exact_choice(m, cap, energy, float(t)) for m, t in zip(mats, totals)]
    width = min(cap, _FIRST_SKETCH)
    while True:
        over = max(_OVERSAMPLE, width // 4)
        sketch = _Sketch(mats, min(width + over, full), generator).refined()
        s = sketch.values()
        ranks = [_rule_rank(si, energy, float(t), cap) for si, t in zip(s, totals)]
        if max(ranks) < width or width >= cap or mode == "randomized" and width + over >= full:
            break
        width = min(cap, 2 * width)
        if mode == "auto" and not sketch_pays(mats.shape, width):
            return [_exact_choice(m, cap, energy, float(t)) for m, t in zip(mats, totals)]
    before = [float(si[:r].double().square().sum()) for si, r in zip(s, ranks)]
    u, s, vh = sketch.refined().svd()
    out = []
    for i, (r, e0) in enumerate(zip(ranks, before)):
        kept = float(s[i, :r].double().square().sum())
        error = (max(kept - e0, 0.0) / kept) ** 0.5 if kept > 0 else 0.0
        if mode == "auto" and error > tol:
            out.append(_exact_choice(mats[i], cap, energy, float(totals[i])))
        else:
            share = kept / float(totals[i]) if totals[i] > 0 else 1.0
            out.append((u[i, :, :r], s[i, :r], vh[i, :r], SvdChoice("randomized", r, share, error)))
    return out


# The first sketch's width: fine-tuning updates keep most of their energy in a few
# dozen directions; the sketch doubles from here when the rank rule needs more.
_FIRST_SKETCH = 64


def _rule_rank(s: Tensor, energy: float, total: float, cap: int) -> int:
    return min(cap, energy_rank(s, energy, total))


def _exact_choice(a: Tensor, cap: int, energy: float, total: float) -> LowRank:
    u, s, vh = exact_svd(a)
    r = _rule_rank(s, energy, total, cap)
    share = float(s[:r].double().square().sum()) / total if total > 0 else 1.0
    return u[:, :r], s[:r], vh[:r], SvdChoice("exact", r, share)


def orthogonalize(m: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns (or rows): ``P Q^T`` from ``m = P S Q^T``."""
    p, _, qh = exact_svd(m)
    return p @ qh
