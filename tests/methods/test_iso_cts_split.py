"""Iso-CTS splits the rank as its authors do (Marczak et al. 2025; FusionBench's and their code)."""

from __future__ import annotations

import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.iso import iso_cts_ranks


def test_rank_split_uses_the_whole_rank_as_the_reference_does() -> None:
    # R = 96, K = 3, f = 0.8: int(76.8) = 76; (96 - 76) / 3 = 6.67 -> 7; c = 96 - 21 = 75.
    assert iso_cts_ranks(96, 3, 0.8) == (75, 7)
    # R = 32, K = 4, f = 0.8: int(25.6) = 25; 7 / 4 = 1.75 -> 2; c = 32 - 8 = 24 (not 25 + 4 x 1).
    assert iso_cts_ranks(32, 4, 0.8) == (24, 2)
    # R = 10, K = 2, f = 0.5: 5 / 2 = 2.5 rounds half to even -> 2; c = 10 - 4 = 6.
    assert iso_cts_ranks(10, 2, 0.5) == (6, 2)
    # f = 1: no task directions.
    assert iso_cts_ranks(96, 3, 1.0) == (96, 0)


def test_merge_reports_the_reference_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(96, 120, generator=g)
    experts = [base + torch.randn(96, 120, generator=g) for _ in range(3)]
    method = get_method("iso_cts")
    out = method(experts, base, [1.0] * 3, method.params(common_space_fraction=0.8))
    assert out.info == {"common_rank": 75, "task_rank": 7}
    # 75 + 3 x 7 = 96 orthonormal directions, every one at the flattened singular value.
    singular = torch.linalg.svdvals(out.tensor - base)
    assert int((singular > 1e-3 * singular[0]).sum()) == 96
    assert torch.allclose(singular, singular.mean().expand_as(singular), rtol=1e-3)
