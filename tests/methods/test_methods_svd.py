"""SVD-based methods (TSV, Iso-C, Iso-CTS) against hand-built spectra."""

from __future__ import annotations

import math

import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.toolkit.svd import svd

T = torch.tensor


def run(name: str, tensors, base, weights=None, generator=None, **params):
    method = get_method(name)
    weights = [1.0] * len(tensors) if weights is None else weights
    return method(tensors, base, weights, method.params.model_validate(params), generator)


def polar(a: torch.Tensor) -> torch.Tensor:
    """a (a^T a)^(-1/2), via an eigendecomposition (independent of the SVD code)."""
    evals, evecs = torch.linalg.eigh(a.T @ a)
    return a @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def diag(*values: float) -> torch.Tensor:
    return torch.diag(T(values))


# --- TSV -------------------------------------------------------------------

def test_tsv_keeps_each_tasks_top_direction():
    base = torch.ones(3, 3)
    d1, d2 = diag(3, 1, 0), diag(0, 0, 2) + 0.5 * torch.outer(T([1.0, 0, 0]), T([0, 1.0, 0]))
    # default rank fraction 1/K = 1/2 -> int(1.5) = 1 direction per task: 3 e1e1^T and 2 e3e3^T
    out = run("tsv", [base + d1, base + d2], base, alpha=0.5)
    assert torch.allclose(out.tensor, base + 0.5 * diag(3, 0, 2), atol=1e-6)
    assert out.info["rank_per_task"] == [1, 1]


def test_tsv_decorrelates_overlapping_left_vectors():
    e1, e2 = T([1.0, 0, 0]), T([0, 1.0, 0])
    u2 = (e1 + e2) / math.sqrt(2)
    d1, d2 = torch.outer(e1, e1), 2 * torch.outer(u2, e2)
    out = run("tsv", [d1, d2], torch.zeros(3, 3), weights=[1.0, 0.5])
    u_perp = polar(torch.stack([e1, u2], dim=1))
    # singular values 1 and 2 * 0.5 (weights scale each task's spectrum); right vectors e1, e2
    expected = torch.outer(u_perp[:, 0], e1) + 1.0 * torch.outer(u_perp[:, 1], e2)
    assert torch.allclose(out.tensor, expected, atol=1e-6)


def test_tsv_one_model_full_rank_is_the_model():
    g = torch.Generator().manual_seed(0)
    base, model = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(run("tsv", [model], base).tensor, model, atol=1e-5)


def test_tsv_rank_above_matrix_size_is_capped():
    u, s, vh = svd(torch.ones(3, 2), rank=10)
    assert (u.shape, s.shape, vh.shape) == ((3, 2), (2,), (2, 2))
    # rank fraction 1 with two tasks asks for 2 x 2 directions of a 2 x 2 matrix
    a, b = diag(1, 2), diag(3, -1)
    out = run("tsv", [a, b], torch.zeros(2, 2), rank_fraction=1.0).tensor
    assert torch.isfinite(out).all() and out.shape == (2, 2)


def test_tsv_zero_deltas_and_1d_tensors():
    base = T([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(run("tsv", [base.clone(), base.clone()], base).tensor, base)
    bias = run("tsv", [T([1.0, 2.0]), T([3.0, 0.0])], T([1.0, 1.0]), alpha=0.5).tensor
    assert torch.allclose(bias, T([1.0, 1.0]) + 0.5 * T([2.0, 0.0]))


def test_tsv_randomized_svd_is_seeded_and_matches_exact_on_low_rank_updates():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    models = [base + torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g) for _ in range(2)]
    exact = run("tsv", models, base).tensor
    rand1 = run("tsv", models, base, generator=torch.Generator().manual_seed(5), svd="randomized").tensor
    rand2 = run("tsv", models, base, generator=torch.Generator().manual_seed(5), svd="randomized").tensor
    assert torch.equal(rand1, rand2)
    assert torch.allclose(rand1, exact, atol=1e-3)


# --- Iso-C -----------------------------------------------------------------

def test_iso_c_flattens_nonzero_spectrum_of_the_sum():
    base = torch.zeros(3, 3)
    out = run("iso_c", [diag(3, 0, 0), diag(0, 1, 0)], base, alpha=1.5)
    # sum diag(3, 1, 0): nonzero singular values {3, 1} -> mean 2; the null direction stays 0
    assert torch.allclose(out.tensor, 1.5 * diag(2, 2, 0), atol=1e-6)
    assert out.info["rank"] == 2


def test_iso_c_is_mean_singular_value_times_polar_factor():
    a, b = T([[1.0, 2.0], [0.0, 1.0]]), T([[0.0, 0.0], [3.0, 3.0]])
    total = a + 2 * b
    sigma_mean = torch.linalg.eigvalsh(total.T @ total).sqrt().mean()
    out = run("iso_c", [a + 1, b + 1], torch.ones(2, 2), weights=[1.0, 2.0]).tensor
    assert torch.allclose(out, 1 + sigma_mean * polar(total), atol=1e-5)


def test_iso_c_zero_deltas_and_1d():
    base = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(run("iso_c", [base.clone()], base).tensor, base)
    assert torch.allclose(run("iso_c", [T([2.0]), T([4.0])], T([1.0])).tensor, T([5.0]))


# --- Iso-CTS ---------------------------------------------------------------

def test_iso_cts_common_plus_task_specific_directions():
    # sum diag(4, 3, 1, .5): common (half of rank 4) = e1, e2; task 1 adds e3 (sigma 1),
    # task 2 adds e4 (sigma .5); flattened mean (4 + 3 + 1 + .5) / 4 = 2.125 on all four.
    d1, d2 = diag(4, 0, 1, 0), diag(0, 3, 0, 0.5)
    out = run("iso_cts", [d1, d2], torch.zeros(4, 4), common_space_fraction=0.5)
    assert torch.allclose(out.tensor, 2.125 * torch.eye(4), atol=1e-6)
    assert out.info == {"common_rank": 2, "task_rank": 1}


def test_iso_cts_with_whole_common_space_is_iso_c():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    models = [base + torch.randn(6, 5, generator=g) for _ in range(3)]
    cts = run("iso_cts", models, base, common_space_fraction=1.0, alpha=0.7).tensor
    assert torch.allclose(cts, run("iso_c", models, base, alpha=0.7).tensor, atol=1e-5)


def test_iso_cts_1d_is_task_arithmetic():
    assert torch.allclose(run("iso_cts", [T([2.0, 0.0])], T([1.0, 1.0]), alpha=2.0).tensor, T([3.0, -1.0]))
