"""TIES merged piece by piece keeps the bits of TIES on whole tensors.

The reference below is the whole-tensor TIES that PivotMerge ran before the
piecewise version: a (K, *shape) stack, torch.kthvalue cut-offs with ties kept in
flat-index order, election by sum(dim=0), disjoint sums accumulated expert by
expert.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.toolkit import pieces
from pivotmerge.methods.toolkit.sparsify import magnitude_cut, magnitude_trim_


def reference_trim_(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    n = d.numel()
    if density <= 0 or n == 0:
        return d.zero_()
    k = max(1, int(density * n))
    mag = d.reshape(-1).abs()
    threshold = torch.kthvalue(mag, n - k + 1).values
    keep = mag > threshold
    tied = (mag == threshold).nonzero().squeeze(1)
    keep[tied[: k - int(keep.sum())]] = True
    return d.mul_(keep.reshape(d.shape))


def reference_ties(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                   densities: Sequence[float], normalize: bool, lam: float) -> torch.Tensor:
    deltas = torch.stack([t - base for t in tensors])
    for d, density in zip(deltas, densities):
        reference_trim_(d, density)
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    weighted = deltas * w
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    mask = weighted * elected > 0
    merged = weighted[0] * mask[0]
    divisor = w[0] * mask[0]
    for k in range(1, len(tensors)):
        merged.addcmul_(weighted[k], mask[k])
        divisor.addcmul_(w[k], mask[k])
    if normalize:
        divisor[divisor == 0] = 1
        merged.div_(divisor)
    return merged.mul_(lam).add_(base)


def bf16_like_models(k: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and experts rounded to bf16 (as read from disk), so many |deltas| tie."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).mul_(0.02).bfloat16().float()
    experts = [torch.randn(shape, generator=g).mul_(0.002).add_(base).bfloat16().float() for _ in range(k)]
    return base, experts


def run_ties(tensors, base, weights, **params) -> torch.Tensor:
    method = get_method("ties")
    return method(tensors, base, weights, method.params.model_validate(params)).tensor


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many pieces on small tensors; a multiple of 64 as PIECE is (see its comment).
    monkeypatch.setattr(pieces, "PIECE", 256)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(37, 29), (1000,), (4, 256), (1,)])
def test_piecewise_ties_matches_whole_tensor_reference(small_pieces: None, k: int, shape: tuple[int, ...]) -> None:
    base, experts = bf16_like_models(k, shape, seed=k * 100 + len(shape))
    weights = [1.0, -0.5, 2.0, 0.3, 1.0, 0.7, 1.5, 0.25][:k]
    densities = [0.5, 0.1, 0.9, 0.33, 1.0, 0.0, 0.5, 0.75][:k]
    for normalize in (True, False):
        got = run_ties(experts, base, weights, density=densities, normalize=normalize, **{"lambda": 0.8})
        want = reference_ties(experts, base, weights, densities, normalize, 0.8)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_cut_spans_pieces_and_keeps_ties_in_flat_order(small_pieces: None) -> None:
    # 700 entries tied at |1| across three pieces, a few larger ones: the kept ties
    # must be the first ones in flat order, wherever the piece boundaries fall.
    d = torch.ones(700)
    d[::3] = -1.0
    d[[5, 300, 650]] = 4.0
    for density in (0.004, 0.3, 0.5, 0.99, 1 / 700):
        want = reference_trim_(d.clone(), density)
        cut = magnitude_cut(d.__getitem__, d.numel(), density)
        got = torch.cat([cut.apply_(d[p].clone()) for p in pieces.flat_pieces(d.numel())])
        assert torch.equal(got, want)
        assert torch.equal(magnitude_trim_(d.clone(), density), want)


def test_cut_of_zero_deltas_and_extreme_magnitudes() -> None:
    zeros = torch.zeros(10)
    assert torch.equal(magnitude_trim_(zeros.clone(), 0.5), reference_trim_(zeros.clone(), 0.5))
    d = torch.tensor([0.0, -0.0, 1e-40, -3e38, float("inf"), 2.0, -2.0, 1e-45])
    for density in (0.2, 0.5, 0.8):
        assert torch.equal(magnitude_trim_(d.clone(), density), reference_trim_(d.clone(), density))


def test_trim_of_non_contiguous_tensor() -> None:
    d = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).t()
    assert torch.equal(magnitude_trim_(d.clone().t().t(), 0.4), reference_trim_(d.contiguous(), 0.4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_on_inputs_as_stored_keeps_the_bits_of_ties_on_float32_copies(monkeypatch, dtype):
    # The engine hands TIES the stored tensors (`stored_inputs`); each piece is converted as read.
    monkeypatch.setattr(pieces, "PIECE", 64)  # several pieces and a ragged last one
    g = torch.Generator().manual_seed(5)
    base = torch.randn(37, 29, generator=g).to(dtype)
    experts = [(base.float() + 0.1 * torch.randn(37, 29, generator=g)).to(dtype) for _ in range(3)]
    ties = get_method("ties")
    assert ties.stored_inputs
    params = ties.params.model_validate({"density": 0.3, "lambda": 0.7})
    stored = ties(experts, base, [1.0, 0.5, 2.0], params).tensor
    copies = ties([e.float() for e in experts], base.float(), [1.0, 0.5, 2.0], params).tensor
    assert stored.dtype == torch.float32 and torch.equal(stored, copies)
