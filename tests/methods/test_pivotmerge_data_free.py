"""PivotMerge without data (combine: covariance): ACE's closed form on the experts' shared parts, against formulas."""

from __future__ import annotations

import pytest
import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.ace import Params as AceParams
from pivotmerge.methods.ace import ace_update


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


def test_defaults_are_the_covariance_combine_at_a_scale_from_the_layer_score():
    base, models = experts()
    out = run(models, base)
    assert out.info["combine"] == "covariance" and out.info["directions_suppressed"] == 0
    # scale_l = 0.4 + (0.8 - 0.4) * s_l, s_l the weighted mean of the experts' shared-energy shares; the shared space
    # holds 0.95 of the deltas' energy
    assert out.info["scale"] == pytest.approx(0.4 + 0.4 * out.info["layer_score"])
    assert out.info["shared_svd"]["energy"] >= 0.95


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
