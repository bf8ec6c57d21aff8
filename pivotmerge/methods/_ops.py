"""Tensor operations shared by the merge methods: small, pure and vectorised.

Deltas are stacked as one ``(K, *shape)`` tensor only where a method needs all
experts at once (sign election, SVD of the concatenation); otherwise they are
formed one at a time and accumulated, so peak memory stays near two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch

Tensor = torch.Tensor
SvdMode = Literal["exact", "randomized", "auto"]

# Power iterations of the fixed-rank randomized range finder (`svd`): two are enough
# for the slowly decaying spectra of fine-tuning updates (Halko et al. 2011, sec. 4.5).
# `low_rank_svd` takes one, then one more to estimate its error.
_POWER_ITERATIONS = 2
_OVERSAMPLE = 8


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


# Pieces of a flat tensor that a method walks instead of the whole: 1M float32
# values (4 MiB), so temporaries stay piece-sized whatever the tensor's size, as
# in the engine's elementwise pieces. A power of two (a multiple of every SIMD
# width): torch's vectorised reductions then add each element's terms in the same
# order in a piece as in the whole tensor, so piecewise results keep their bits.
PIECE = 1 << 20


def flat_pieces(n: int) -> Iterator[slice]:
    """Consecutive ``PIECE``-sized slices covering ``n`` flat elements."""
    return (slice(start, start + PIECE) for start in range(0, n, PIECE))


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
    high = sum(torch.bincount(_magnitude_bits(delta(p)) >> 16, minlength=_HIGH_BINS) for p in flat_pieces(n))
    top, above = _top_bin(high, k)
    low = sum(torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=_LOW_BINS)
              for bits in (_magnitude_bits(delta(p)) for p in flat_pieces(n)))
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
    # vectorised, about 2.5x faster than `bernoulli_` on CPU (7.8 of dare_ties' 14 s CPU on 194M models).
    d.mul_(torch.rand(d.shape, generator=generator, dtype=d.dtype, device=d.device) < density)
    if rescale == "inverse_density":
        d.div_(density)
    elif l1_before is not None:
        l1_after = d.abs().sum()
        # Like mergekit: leave near-empty results unscaled instead of blowing them up.
        if l1_before >= 1e-7 and l1_after >= 1e-7:
            d.mul_(l1_before / l1_after)
    return d


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


def normalize_by_weight_sum(merged: Tensor, weights: Sequence[float]) -> Tensor:
    """Divide by ``sum_k w_k`` (a sum too close to zero divides by 1, as in mergekit)."""
    total = float(sum(weights))
    return merged if abs(total) < 1e-8 else merged.div_(total)


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


# Below this smaller side LAPACK's SVD is cheap (well under a second on one core)
# and `auto` always takes it. Above it, an exact SVD is the eigendecomposition of
# the float64 Gram matrix: two (m, n) x (n, n) products and an (n, n) eigh, 2-5x
# faster than LAPACK's gesdd on one core (32000 x 1024: 8 s against 16 s,
# 1024 x 3072: 1.5 s against 8 s, on this project's loaded 2-core machine).
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
        return {"svd": self.svd, "rank": self.rank, "energy": round(self.energy, 6), "error": float(f"{self.error:.3g}")}


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
