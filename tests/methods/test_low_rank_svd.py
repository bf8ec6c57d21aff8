"""The SVD helpers: the exact Gram route, the rank rule and the randomized SVD's error contract."""

from __future__ import annotations

import functools

import pytest
import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.toolkit.svd import EXACT_LAPACK_SIDE, SVD_TOLERANCE, exact_svd, low_rank_svd, low_rank_svds, svd


@functools.lru_cache(maxsize=8)
def factors(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q,
            torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q)


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """An (m, n) matrix whose singular values are exactly `s` (orthonormal factors from QR);
    with `rank`, its exact truncation to that many directions."""
    u, v = factors(m, n, s.numel(), seed)
    r = s.numel() if rank is None else rank
    return ((u[:, :r] * s[:r].double()) @ v[:, :r].T).float()


def low_rank_plus_noise(m: int, n: int, rank: int, noise_share: float, seed: int) -> torch.Tensor:
    """A fine-tuning-like update: a low-rank part with decaying spectrum, plus dense noise
    holding `noise_share` of the energy."""
    signal = with_spectrum(m, n, 0.8 ** torch.arange(rank, dtype=torch.float64), seed)
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1))
    noise *= (noise_share / (1 - noise_share)) ** 0.5 * signal.norm() / noise.norm()
    return signal + noise


def truncated(a: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (2, 300, 280)])
def test_gram_route_is_an_exact_svd(shape):
    assert min(shape[-2:]) > EXACT_LAPACK_SIDE  # the Gram route, not LAPACK
    s_true = torch.linspace(5, 0.01, min(shape[-2:]))
    a = torch.stack([with_spectrum(*shape[-2:], s_true, seed=k) for k in range(shape[0] if len(shape) == 3 else 1)])
    a = a if len(shape) == 3 else a[0]
    u, s, vh = exact_svd(a)
    assert torch.allclose(s, s_true.expand_as(s), rtol=1e-4, atol=1e-6)
    assert torch.allclose((u * s.unsqueeze(-2)) @ vh, a, atol=1e-5)
    eye = torch.eye(s.shape[-1])
    assert torch.allclose(u.mT @ u, eye.expand_as(u.mT @ u), atol=1e-4)


def test_gram_route_stays_finite_on_rank_deficient_matrices():
    a = with_spectrum(300, 280, torch.tensor([3.0, 2.0, 1.0]))  # rank 3
    u, s, vh = exact_svd(a)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert torch.allclose(s[:3], torch.tensor([3.0, 2.0, 1.0]), rtol=1e-5) and float(s[3:].max()) < 1e-5
    assert torch.allclose((u * s) @ vh, a, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "randomized", "auto"])
def test_rank_rule_is_the_fewest_directions_holding_the_energy_share_capped(mode):
    # energies 16, 9, 4, 1 (and a tail of 0.01^2 each): shares .53, .83, .97, 1.0
    s = torch.cat([torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.full((60,), 0.01)])
    a = with_spectrum(700, 600, s)
    total = float(s.double().square().sum())
    g = torch.Generator().manual_seed(0)
    for energy, cap, rank in [(0.9, None, 3), (0.9, 2, 2), (0.999, None, 4)]:
        u, sv, vh, choice = low_rank_svd(a, cap, energy, mode, g)
        assert choice.rank == rank == sv.numel() == u.shape[1] == vh.shape[0]
        assert choice.energy == pytest.approx(float(s[:rank].double().square().sum()) / total, rel=1e-4)
        assert torch.allclose(sv, s[:rank], rtol=1e-4)
    assert low_rank_svd(a, None, 0.9, mode, g)[3].svd == ("exact" if mode == "exact" else "randomized")


@pytest.mark.parametrize("seed", range(2))
def test_randomized_svd_stays_within_its_tolerance_on_fine_tuning_like_updates(seed):
    a = low_rank_plus_noise(1024, 640, rank=24, noise_share=0.05, seed=seed)
    u, s, vh, choice = low_rank_svd(a, None, 0.9, "auto", torch.Generator().manual_seed(seed))
    assert choice.svd == "randomized"
    exact = truncated(a, choice.rank)
    error = float(((u * s) @ vh - exact).norm() / exact.norm())
    assert error < SVD_TOLERANCE
    assert error <= choice.error + 1e-5  # the recorded estimate bounds the real error here


def test_auto_returns_the_exact_svd_unless_within_tolerance():
    """Whatever the spectrum, auto's answer is exact or within the tolerance of exact."""
    g = torch.Generator().manual_seed(3)
    spectra = {"heavy tail": 1 / torch.arange(1, 601).sqrt(), "flat noise": torch.ones(600),
               "low rank": 0.7 ** torch.arange(600)}
    for name, s in spectra.items():
        a = with_spectrum(700, 600, s, seed=7)
        for energy in (0.5, 0.9):
            u, sv, vh, choice = low_rank_svd(a, None, energy, "auto", g)
            exact = with_spectrum(700, 600, s, seed=7, rank=choice.rank)
            error = float(((u * sv) @ vh - exact).norm() / exact.norm())
            assert choice.svd == "exact" or error < SVD_TOLERANCE, (name, energy, choice, error)


def test_batched_svds_choose_each_matrix_its_own_rank():
    mats = torch.stack([with_spectrum(700, 600, torch.tensor(s), seed=k)
                        for k, s in enumerate([[4.0, 3.0, 2.0, 1.0], [5.0, 0.1, 0.1, 0.1]])])
    ranks = [c.rank for *_, c in low_rank_svds(mats, None, 0.9, "randomized", torch.Generator().manual_seed(0))]
    assert ranks == [3, 1]


def test_auto_takes_lapack_on_small_matrices():
    a = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for got, want in zip(svd(a, 5, "auto"), torch.linalg.svd(a, full_matrices=False)):
        assert torch.equal(got, want[..., :5] if got.dim() == 1 else (want[:, :5] if got.shape[0] == 40 else want[:5]))


def test_methods_record_each_tensors_svd_choice():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(700, 600)
    models = [low_rank_plus_noise(700, 600, 8, 0.02, seed=k) for k in range(2)]
    tsv = get_method("tsv")
    out = tsv(models, base, [1.0, 1.0], tsv.params.model_validate({"energy": 0.9}), g)
    assert [c["svd"] for c in out.info["svd_per_task"]] == ["randomized"] * 2
    assert out.info["rank_per_task"] == [c["rank"] for c in out.info["svd_per_task"]]
    pm = get_method("pivotmerge")
    info = pm(models, base, [1.0, 1.0], pm.params.model_validate({}), g).info
    assert info["shared_svd"]["svd"] == "randomized" and info["shared_svd"]["rank"] == info["rank"]
    assert info["shared_svd"]["energy"] >= 0.9
