"""WUDI, ACE and CART against formulas worked out by hand on small tensors, and bad input naming the field."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pivotmerge.methods import get_method

T = torch.tensor


def run(name: str, tensors, base=None, weights=None, **params):
    method = get_method(name)
    weights = [1.0] * len(tensors) if weights is None else weights
    return method(tensors, base, weights, method.params.model_validate(params))


# --- wudi ------------------------------------------------------------------

def test_wudi_closed_form_keeps_each_task_on_its_own_inputs():
    # tau_1 = [1, 0], tau_2 = [1, 1]: G_1 = diag(1, 0), G_2 = [[.5, .5], [.5, .5]]; sum G = [[1.5, .5], [.5, .5]],
    # sum tau_k G_k = [1, 0] + [1, 1] = [2, 1]; tau (sum G) = [2, 1] gives tau = [1, 1], which leaves both tasks'
    # interference at zero: (tau - tau_1) tau_1^T = 0 and tau - tau_2 = 0.
    base = T([[1.0, -1.0]])
    out = run("wudi", [base + T([[1.0, 0.0]]), base + T([[1.0, 1.0]])], base, solver="closed_form", ridge=0.0)
    assert torch.allclose(out.tensor, base + T([[1.0, 1.0]]), atol=1e-6)
    assert out.info == {"solver": "closed_form"}


def test_wudi_closed_form_ridge_and_scale_and_weights():
    # Orthogonal inputs: G_1 = diag(1, 0), G_2 = diag(0, 1), so sum_k w_k G_k = diag(w_1, w_2) and
    # sum_k w_k tau_k G_k = [2 w_1, 3 w_2]; the ridge adds rho * mean diag = rho (w_1 + w_2) / 2 to the diagonal.
    base = torch.zeros(1, 2)
    w1, w2, rho, scale = 1.0, 3.0, 0.5, 0.7
    out = run("wudi", [T([[2.0, 0.0]]), T([[0.0, 3.0]])], base, [w1, w2], solver="closed_form", ridge=rho, scale=scale)
    add = rho * (w1 + w2) / 2
    assert torch.allclose(out.tensor, scale * T([[2 * w1 / (w1 + add), 3 * w2 / (w2 + add)]]), atol=1e-6)


def test_wudi_adam_first_step_is_the_sign_of_the_gradient():
    # From tau = sum_k tau_k, Adam's first step is -lr * m_1 / (sqrt(v_1) + eps) = -lr * g / (|g| + eps'),
    # with g = 2 (tau sum_k G_k - sum_k tau_k G_k).
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    deltas = [torch.randn(3, 4) for _ in range(3)]
    grams = [d.T @ d / d.square().sum() for d in deltas]
    tau = sum(deltas)
    grad = 2 * (tau @ sum(grams) - sum(d @ g for d, g in zip(deltas, grams)))
    lr = 0.1
    expected = base + tau - lr * grad / (grad.abs() + 1e-8)
    out = run("wudi", [base + d for d in deltas], base, iterations=1, learning_rate=lr)
    assert torch.allclose(out.tensor, expected, atol=1e-5)


def test_wudi_adam_lowers_the_interference_and_vectors_take_the_mean():
    torch.manual_seed(1)
    base = torch.randn(8, 6)
    deltas = [torch.randn(8, 6) * 0.01 for _ in range(3)]

    def loss(tau):
        return sum(((tau - d) @ d.T).square().sum() / d.square().sum() for d in deltas)
    out = run("wudi", [base + d for d in deltas], base, iterations=50, learning_rate=1e-3)
    assert loss(out.tensor - base) < 0.5 * loss(sum(deltas))
    vec = run("wudi", [T([1.0, 2.0]), T([3.0, 6.0])], T([1.0, 1.0]), [1.0, 3.0], scale=2.0).tensor
    # weighted mean of the deltas [0, 1] and [2, 5] with weights 1, 3: [1.5, 4]; doubled onto the base
    assert torch.allclose(vec, T([4.0, 9.0]))


# --- ace -------------------------------------------------------------------

def test_ace_homogeneous_experts_solve_the_centred_system_with_the_prior():
    # tau_1 = [1, 3]^T, tau_2 = [2, 4]^T (m = 2, n = 1): traces 10, 20, gamma = var(log) / mean(log)^2 = 0.034, no flag.
    # Centred rows c_1 = c_2 = [-1, 1]^T, S_t = 2, ridged 2.01; prior = column mean of S_1 + S_2 = 4;
    # update = (c_1 + c_2) 2.01 / (2 * 2.01 + 4) = [-4.02, 4.02] / 8.02.
    base = torch.zeros(2, 1)
    out = run("ace", [T([[1.0], [3.0]]), T([[2.0], [4.0]])], base)
    assert out.info == {"heterogeneous": False}
    assert torch.allclose(out.tensor, T([[-4.02], [4.02]]) / 8.02, atol=1e-6)


def test_ace_heterogeneous_experts_are_trace_normalised_and_refined():
    # tau_1 = [1, 3]^T (trace 10), tau_2 = [.01, .03]^T (trace 1e-3): gamma ~ 8 > 0.3, flag.
    # S_1 = S_2 = 1 after normalising (raw 2 and 2e-4), eps_t = .01 / raw: .005 and 50; ridged 1.005 and 51;
    # prior = 2 / mean raw trace (10.001 / 2); update_0 = (c_1 1.005 + c_2 51) / (52.005 + prior), c_1 = [-1, 1]^T,
    # c_2 = [-.01, .01]^T. Refinement: D = update_0 + (tau_1 + tau_2)(1 - (1.005 + 51) / 2); with n = 1 and
    # k_frac = 1 the boost is D itself (its one singular value times U V^T).
    base = torch.zeros(2, 1)
    t1, t2 = T([[1.0], [3.0]]), T([[0.01], [0.03]])
    update0 = (T([[-1.0], [1.0]]) * 1.005 + T([[-0.01], [0.01]]) * 51) / (52.005 + 2 / (10.001 / 2))
    refined = update0 + (t1 + t2) * (1 - (1.005 + 51) / 2)
    out = run("ace", [t1, t2], base, k_frac=1.0)
    assert out.info == {"heterogeneous": True}
    assert torch.allclose(out.tensor, update0 + refined, rtol=1e-4)
    # k_frac 0.3 of rank 1 boosts nothing
    assert torch.allclose(run("ace", [t1, t2], base).tensor, update0, rtol=1e-4)


def test_ace_vectors_take_the_scaled_mean():
    out = run("ace", [T([1.0, 2.0]), T([3.0, 4.0])], T([1.0, 1.0]), scale=0.5).tensor
    assert torch.allclose(out, T([1.0 + 0.5 * 1.0, 1.0 + 0.5 * 2.0]))


# --- cart ------------------------------------------------------------------

def test_cart_average_plus_scaled_low_rank_residuals():
    # W = diag(3, 0), diag(0, 3), diag(0, .3): average diag(1, 1.1); residuals diag(2, -1.1), diag(-1, 1.9),
    # diag(-1, -.8), whose top-1 parts are diag(2, 0), diag(0, 1.9), diag(-1, 0); sum diag(1, 1.9).
    ws = [torch.diag(T([3.0, 0.0])), torch.diag(T([0.0, 3.0])), torch.diag(T([0.0, 0.3]))]
    out = run("cart", ws, None, prior=2.0, rank_ratio=0.5)
    assert torch.allclose(out.tensor, torch.diag(T([1.0 + 2 * 1.0, 1.1 + 2 * 1.9])), atol=1e-6)
    assert out.info == {"rank": 1}
    # Whole residuals sum to zero around the average, and prior 0 is the average itself.
    for params in ({"rank_ratio": 1.0}, {"prior": 0.0}, {"rank_ratio": 0.0}):
        assert torch.allclose(run("cart", ws, None, **params).tensor, torch.diag(T([1.0, 1.1])), atol=1e-6)


def test_cart_weights_weigh_the_average_and_the_residuals():
    ws = [T([[2.0, 0.0]]), T([[0.0, 4.0]])]
    # average (1 * [2, 0] + 3 * [0, 4]) / 4 = [.5, 3]; residuals [1.5, -3] and [-.5, 1] (rank 1 each, kept whole);
    # weighted sum 1 * [1.5, -3] + 3 * [-.5, 1] = 0.
    out = run("cart", ws, None, [1.0, 3.0], rank_ratio=0.5)
    assert torch.allclose(out.tensor, T([[0.5, 3.0]]), atol=1e-6)
    vec = run("cart", [T([1.0, 2.0]), T([3.0, 6.0])], None).tensor
    assert torch.allclose(vec, T([2.0, 4.0]))


# --- listing and bad input ---------------------------------------------------

def test_new_baselines_are_listed_with_search_spaces():
    assert set(get_method("wudi").search_space) == {"solver", "scale", "ridge"}
    assert set(get_method("ace").search_space) == {"scale", "eps", "k_frac"}
    assert set(get_method("cart").search_space) == {"prior", "rank_ratio"}
    assert get_method("cart").base == "unused"


@pytest.mark.parametrize("method, params, field", [
    ("wudi", {"solver": "sgd"}, "solver"), ("wudi", {"ridge": -1.0}, "ridge"),
    ("wudi", {"iterations": 0}, "iterations"),
    ("wudi", {"learning_rate": 0.0}, "learning_rate"), ("ace", {"eps": 0.0}, "eps"), ("ace", {"k_frac": 1.5}, "k_frac"),
    ("cart", {"rank_ratio": 2.0}, "rank_ratio"), ("cart", {"prior": -1.0}, "prior"), ("cart", {"rank": 3}, "rank"),
])
def test_bad_parameters_name_the_field(method, params, field):
    with pytest.raises(pydantic.ValidationError) as exc:
        get_method(method).params.model_validate(params)
    assert [e["loc"] for e in exc.value.errors()] == [(field,)]
