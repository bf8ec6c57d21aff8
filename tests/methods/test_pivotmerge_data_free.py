"""PivotMerge without data (combine: covariance): ACE's closed form on the experts' shared parts, against formulas."""

from __future__ import annotations

import pytest
import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.ace import Params as AceParams
from pivotmerge.methods.ace import ace_update
from pivotmerge.methods.pivotmerge import separation


def run(tensors, base, weights=None, **params):
    method = get_method("pivotmerge")
    weights = [1.0] * len(tensors) if weights is None else weights
    return method(tensors, base, weights, method.params.model_validate(params))


def experts(k=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + torch.randn(*shape, generator=g) for _ in range(k)]


def ace_of(parts, weights=None):
    return ace_update(torch.stack(parts), [1.0] * len(parts) if weights is None else weights, AceParams())[0]


def test_defaults_are_the_covariance_combine_scaled_by_its_separation():
    base, models = experts()
    out = run(models, base)
    assert out.info["combine"] == "covariance" and out.info["directions_suppressed"] == 0
    assert out.info["shared_svd"]["energy"] >= 0.95
    # The same combine with the same energy-share expert weights at scale 1 gives the unscaled update M;
    # separation = (||M|| / sqrt(mean_k ||d_k||^2) - 1/sqrt(3)) / (sqrt(3) - 1/sqrt(3)), clamped to [0, 1];
    # scale_l = 0 + 0.6 * separation.
    update = run(models, base, layer_weighting="weight", scale_min=1.0, scale_max=1.0).tensor - base
    rms = (sum(float((m - base).square().sum()) for m in models) / 3) ** 0.5
    expected = min(1.0, max(0.0, (float(update.norm()) / rms - 3 ** -0.5) / (3 ** 0.5 - 3 ** -0.5)))
    assert 0 < expected < 1
    assert out.info["layer_score"] == pytest.approx(expected, rel=1e-5)
    assert out.info["scale"] == pytest.approx(0.6 * expected, rel=1e-5)
    assert torch.allclose(out.tensor, base + 0.6 * expected * update, atol=1e-5)


@pytest.mark.parametrize(("second", "score"), [
    ("disjoint", 1.0),  # sum of two orthogonal updates of equal norm: rho = sqrt(2), the top of the range
    ("same", 1.0),  # sum of two equal updates: rho = 2, clamped
    ("opposite", 0.0),  # they cancel: rho = 0, clamped; the tensor stays at the base (scale_min 0)
])
def test_separation_places_the_merged_update_between_mean_and_sum(second, score):
    d1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    d2 = {"disjoint": torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]]), "same": d1, "opposite": -d1}[second]
    base = torch.ones(2, 4)
    out = run([base + d1, base + d2], base, combine="sum", shared_space=False, scale_max=0.8)
    assert out.info["layer_score"] == pytest.approx(score)
    assert torch.allclose(out.tensor, base + 0.8 * score * (d1 + d2), atol=1e-6)


def test_separation_of_a_mean_like_update():
    # K = 4, ||M|| equal to the experts' rms norm: rho = 1, separation (1 - 1/2) / (2 - 1/2) = 1/3
    assert separation(torch.full((2, 2), 0.5), torch.ones(4)) == pytest.approx(1 / 3)
    assert separation(torch.ones(2, 2), torch.ones(1)) == 1.0  # one expert: nothing to separate
    assert separation(torch.ones(2, 2), torch.zeros(3)) == 1.0  # no update at all


def test_without_shared_space_it_is_ace_on_the_whole_deltas():
    base, models = experts()
    weights = [1.0, 0.5, 2.0]
    out = run(models, base, weights, shared_space=False, layer_weighting="uniform", scale_max=0.7)
    expected = base + 0.7 * ace_of([m - base for m in models], weights)
    assert torch.allclose(out.tensor, expected, atol=1e-5)


def test_shared_space_gives_ace_the_projected_deltas():
    base, models = experts(k=2, shape=(4, 3))
    deltas = [m - base for m in models]
    u = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False).U
    out = run(models, base, max_rank=2, layer_weighting="uniform", scale_max=1.0)
    projected = [u[:, :2] @ (u[:, :2].T @ d) for d in deltas]
    assert out.info["rank"] == 2
    assert torch.allclose(out.tensor, base + ace_of(projected), atol=1e-5)
    # the residuals, kept whole, give ace the whole deltas back
    whole = run(models, base, max_rank=2, residual_weight=1.0, layer_weighting="uniform", scale_max=1.0)
    assert torch.allclose(whole.tensor, base + ace_of(deltas), atol=1e-5)


def test_filtering_removes_cancelling_shared_directions_from_every_expert():
    # d1 = e1 x a + e2 x b, d2 = -e1 x a + e2 x c: on e1 the experts cancel (conflict 1), on e2 they do not.
    a, b, c = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.5])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    d1, d2 = torch.outer(e1, a) + torch.outer(e2, b), -torch.outer(e1, a) + torch.outer(e2, c)
    out = run([d1, d2], torch.zeros(2, 3), shared_space=False, filtering=True, layer_weighting="uniform", scale_max=1.0)
    assert out.info["directions_suppressed"] == 1
    assert torch.allclose(out.tensor, ace_of([torch.outer(e2, b), torch.outer(e2, c)]), atol=1e-5)
