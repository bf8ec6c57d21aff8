"""Classic merge methods against formulas worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from pivotmerge.methods import get_method
from pivotmerge.methods.toolkit.sparsify import magnitude_trim_

T = torch.tensor


def run(name: str, tensors, base=None, weights=None, generator=None, **params):
    method = get_method(name)
    weights = [1.0] * len(tensors) if weights is None else weights
    return method(tensors, base, weights, method.params.model_validate(params), generator).tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- task arithmetic -------------------------------------------------------

def test_task_arithmetic_formula():
    base = T([1.0, 2.0])
    # deltas [1, 0] and [0, 3]; 0.5 * (1*[1,0] + 2*[0,3]) = [0.5, 3]
    out = run("task_arithmetic", [T([2.0, 2.0]), T([1.0, 5.0])], base, [1.0, 2.0], **{"lambda": 0.5})
    assert torch.allclose(out, T([1.5, 5.0]))


def test_task_arithmetic_normalize_divides_by_weight_sum():
    out = run("task_arithmetic", [T([2.0, 2.0]), T([1.0, 5.0])], T([1.0, 2.0]), [1.0, 2.0], normalize=True)
    assert torch.allclose(out, T([1.0 + 1 / 3, 2.0 + 6 / 3]))


def test_task_arithmetic_one_model_and_zero_deltas():
    base = T([[1.0, -1.0], [0.5, 2.0]])
    assert torch.allclose(run("task_arithmetic", [base + 3], base), base + 3)
    assert torch.equal(run("task_arithmetic", [base.clone(), base.clone()], base), base)


def test_task_arithmetic_does_not_modify_inputs():
    base, a = T([1.0, 2.0]), T([3.0, 4.0])
    run("task_arithmetic", [a], base, **{"lambda": 2.0})
    assert torch.equal(base, T([1.0, 2.0])) and torch.equal(a, T([3.0, 4.0]))


# --- TIES ------------------------------------------------------------------

TIES_DELTAS = [T([3.0, -1.0, 2.0, 0.5]), T([-1.0, 2.0, -4.0, 1.0]), T([2.0, -3.0, 1.0, -0.1])]


def test_ties_trim_elect_disjoint_mean():
    # trimmed at density 0.5: [3,0,2,0], [0,2,-4,0], [2,-3,0,0]; sums [5,-1,-2,0]
    # signs + - - (+ on a zero sum); agreeing means: (3+2)/2, -3, -4, nothing -> 0
    out = run("ties", TIES_DELTAS, torch.zeros(4), density=0.5)
    assert torch.allclose(out, T([2.5, -3.0, -4.0, 0.0]))


def test_ties_weights_enter_election_and_divisor():
    # weighted trimmed: [6,0,4,0], [0,2,-4,0], [2,-3,0,0]; sums [8,-1,0,0]
    # entry 2 sums to 0 -> elected +, only expert 1 (weight 2) agrees: 4 / 2 = 2
    out = run("ties", TIES_DELTAS, torch.zeros(4), [2.0, 1.0, 1.0], density=0.5)
    assert torch.allclose(out, T([8 / 3, -3.0, 2.0, 0.0]))
    raw = run("ties", TIES_DELTAS, torch.zeros(4), [2.0, 1.0, 1.0], density=0.5, normalize=False)
    assert torch.allclose(raw, T([8.0, -3.0, 4.0, 0.0]))


def test_ties_per_model_density_and_lambda():
    # density [1, 0.25, 0.5]: [3,-1,2,.5], [0,0,-4,0], [2,-3,0,0]; sums [5,-4,-2,.5]
    out = run("ties", [d + 10 for d in TIES_DELTAS], torch.full((4,), 10.0), density=[1.0, 0.25, 0.5], **{"lambda": 2.0})
    expected = T([2.5, -2.0, -4.0, 0.5]) * 2 + 10
    assert torch.allclose(out, expected)


def test_ties_all_signs_conflict_mass_wins():
    out = run("ties", [T([1.0, -1.0]), T([-3.0, 3.0])], torch.zeros(2))
    assert torch.allclose(out, T([-3.0, 3.0]))


def test_ties_one_model_density_one_is_the_model_and_zero_deltas_the_base():
    base = T([[0.5, 1.0], [2.0, -1.0]])
    model = T([[1.5, 0.0], [2.5, -4.0]])
    assert torch.allclose(run("ties", [model], base), model)
    assert torch.equal(run("ties", [base.clone(), base.clone()], base), base)


def test_ties_density_arrives_per_model_list_of_wrong_length():
    with pytest.raises(ValueError, match="density"):
        run("ties", TIES_DELTAS, torch.zeros(4), density=[0.5, 0.5])


def test_magnitude_trim_keeps_exact_count_even_with_ties():
    d = T([1.0, -1.0, 1.0, 1.0, 0.5])
    magnitude_trim_(d, 0.4)  # int(0.4 * 5) = 2 entries of the four tied at |1|
    assert int((d != 0).sum()) == 2 and set(d[d != 0].abs().tolist()) == {1.0}
    small = T([0.1, -5.0, 0.2])
    magnitude_trim_(small, 0.01)  # at least one entry survives, as in mergekit
    assert torch.equal(small, T([0.0, -5.0, 0.0]))


def test_ties_matches_mergekit_definition():
    sparsify = pytest.importorskip("mergekit.sparsify")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    g = gen(0)
    base = torch.randn(16, 12, generator=g)
    models = [base + torch.randn(16, 12, generator=g) for _ in range(3)]
    weights, density = [1.0, 0.7, 1.3], [0.3, 0.5, 0.8]
    # mergekit's ties, step by step with its own functions (normalize: true, lambda 1).
    deltas = torch.stack([sparsify.magnitude(m - base, d) for m, d in zip(models, density)])
    w = T(weights).reshape(-1, 1, 1)
    deltas = deltas * w
    mask = gta.get_mask(deltas, method="sum")
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    expected = base + (deltas * mask).sum(0) / divisor
    out = run("ties", models, base, weights, density=density)
    assert torch.allclose(out, expected, atol=1e-6)


# --- DARE ------------------------------------------------------------------

def test_dare_density_one_is_task_arithmetic_and_ties():
    base = torch.zeros(4)
    assert torch.allclose(run("dare_linear", TIES_DELTAS, base, **{"lambda": 0.5}), 0.5 * sum(TIES_DELTAS))
    # dare_ties defaults to normalize: false, as in mergekit
    assert torch.allclose(run("dare_ties", TIES_DELTAS, base), run("ties", TIES_DELTAS, base, normalize=False))
    assert torch.allclose(run("dare_ties", TIES_DELTAS, base, normalize=True), run("ties", TIES_DELTAS, base))


def test_dare_is_reproducible_per_seed():
    base = torch.zeros(64, 32)
    models = [torch.randn(64, 32, generator=gen(k)) for k in range(3)]
    for name in ("dare_linear", "dare_ties"):
        a = run(name, models, base, generator=gen(7), density=0.4)
        b = run(name, models, base, generator=gen(7), density=0.4)
        c = run(name, models, base, generator=gen(8), density=0.4)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dare_drops_and_rescales_by_inverse_density():
    base = torch.full((100, 100), 2.0)
    model = base + torch.rand(100, 100, generator=gen(1)) + 0.5  # deltas in [0.5, 1.5)
    out = run("dare_linear", [model], base, generator=gen(3), density=0.25)
    kept = out != base
    assert torch.allclose(out[kept], base[kept] + (model - base)[kept] / 0.25)
    assert abs(float(kept.float().mean()) - 0.25) < 0.03


def test_dare_l1_rescale_restores_the_l1_norm():
    base = torch.zeros(50, 40)
    model = torch.randn(50, 40, generator=gen(2))
    out = run("dare_linear", [model], base, generator=gen(4), density=0.3, rescale="l1")
    assert math.isclose(float(out.abs().sum()), float(model.abs().sum()), rel_tol=1e-5)
    assert int((out != 0).sum()) < 0.4 * out.numel()


def test_dare_ties_elects_on_surviving_entries():
    # One expert is dropped entirely at density 0 (zero deltas never vote).
    out = run("dare_ties", [T([1.0, -2.0]), T([-5.0, 5.0])], torch.zeros(2),
              generator=gen(0), density=[1.0, 0.0])
    assert torch.allclose(out, T([1.0, -2.0]))


# --- SLERP -----------------------------------------------------------------

def test_slerp_endpoints_and_midpoint():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    assert torch.allclose(run("slerp", [v0, v1], t=0.0), v0)
    assert torch.allclose(run("slerp", [v0, v1], t=1.0), v1)
    assert torch.allclose(run("slerp", [v0, v1], t=0.5), T([math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_unequal_norms_follow_the_formula():
    # theta = pi/2: coefficients sin(pi/4) / sin(pi/2) on both tensors.
    out = run("slerp", [T([2.0, 0.0]), T([0.0, 1.0])], t=0.5)
    assert torch.allclose(out, T([2 * math.sqrt(0.5), math.sqrt(0.5)]))
    out = run("slerp", [T([1.0, 0.0]), T([0.0, 1.0])], t=1 / 3)
    assert torch.allclose(out, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_colinear_falls_back_to_lerp():
    out = run("slerp", [T([1.0, 2.0]), T([2.0, 4.0])], t=0.25)
    assert torch.allclose(out, T([1.25, 2.5]))
    anti = run("slerp", [T([1.0, 2.0]), T([-1.0, -2.0])], t=0.5)
    assert torch.allclose(anti, torch.zeros(2))


def test_slerp_takes_exactly_two_models():
    m = get_method("slerp")
    assert (m.min_models, m.max_models) == (2, 2)
