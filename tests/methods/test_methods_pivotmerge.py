"""PivotMerge: each part against a hand computation, and its reductions to known methods."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pivotmerge.methods import Calibration, get_method

T = torch.tensor
OFF = dict(shared_space=False, filtering=False, spectrum="keep", layer_weighting="uniform")
DATA = ("grams", "cross_grams", "alignment")  # calibration data, the method's own argument


def run(tensors, base, weights=None, generator=None, **params):
    # The formulas below are the sum combine's, at its scales (the covariance default has tests of its own).
    params.setdefault("combine", "sum")
    for name, value in (("scale_max", 1.0), ("scale_min", 0.5)):
        if name not in params and name.replace("scale", "lambda") not in params:
            params[name] = value
    method = get_method("pivotmerge")
    weights = [1.0] * len(tensors) if weights is None else weights
    data = Calibration(**{k: params.pop(k) for k in DATA if k in params})
    return method(tensors, base, weights, method.params.model_validate(params), generator, data)


def other(name, tensors, base, **params):
    method = get_method(name)
    data = Calibration(**{k: params.pop(k) for k in DATA if k in params})
    return method(tensors, base, [1.0] * len(tensors), method.params.model_validate(params), None, data).tensor


def experts(k=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + torch.randn(*shape, generator=g) for _ in range(k)]


def outer(u, v):
    return torch.outer(T(u), T(v))


# --- reductions ------------------------------------------------------------

def test_all_parts_off_is_task_arithmetic():
    base, models = experts()
    out = run(models, base, [1.0, 0.5, 2.0], lambda_max=0.7, **OFF)
    expected = base + 0.7 * sum(w * (m - base) for w, m in zip([1.0, 0.5, 2.0], models))
    assert torch.allclose(out.tensor, expected, atol=1e-5)
    assert out.info["scale"] == 0.7 and out.info["directions_suppressed"] == 0


def test_flatten_alone_is_iso_c():
    base, models = experts()
    out = run(models, base, lambda_max=1.3, **{**OFF, "spectrum": "flatten"})
    assert torch.allclose(out.tensor, other("iso_c", models, base, alpha=1.3), atol=1e-5)


def test_full_energy_shared_space_loses_nothing():
    base, models = experts()
    out = run(models, base, **{**OFF, "shared_space": True, "energy": 1.0})
    assert torch.allclose(out.tensor, other("task_arithmetic", models, base), atol=1e-4)
    assert out.info["energy_kept"] == pytest.approx(1.0)


def test_shared_part_plus_whole_residual_is_the_whole_delta():
    base, models = experts()
    out = run(models, base, **{**OFF, "shared_space": True, "energy": 0.5, "residual_weight": 1.0})
    assert out.info["rank"] < 5 and out.info["energy_kept"] < 1
    assert torch.allclose(out.tensor, other("task_arithmetic", models, base), atol=1e-4)


# --- shared space and residual ----------------------------------------------

def test_residual_weight_zero_projects_onto_the_shared_space():
    base, models = experts(k=2, shape=(6, 4))
    deltas = [m - base for m in models]
    # Independent basis: eigenvectors of sum_k d_k d_k^T are the left singular vectors of [d_1 d_2].
    evals, evecs = torch.linalg.eigh(sum(d @ d.T for d in deltas))
    energy = evals.flip(0).cumsum(0) / evals.sum()
    r = int((energy < 0.6).sum()) + 1
    u = evecs.flip(1)[:, :r]
    out = run(models, base, **{**OFF, "shared_space": True, "energy": 0.6, "residual_weight": 0.0})
    assert out.info["rank"] == r
    assert torch.allclose(out.tensor, base + u @ u.T @ sum(deltas), atol=1e-4)


def test_max_rank_caps_and_residual_rank_truncates():
    # d1 = 3 e1 x e1 + e2 x e2, d2 = 2 e1 x e1: shared direction e1 alone at max_rank 1;
    # residuals: d1 -> e2 x e2 (rank 1), d2 -> 0; a residual rank of 1 keeps e2 x e2 whole.
    d1, d2 = outer([1.0, 0, 0], [3.0, 0]) + outer([0, 1.0, 0], [0, 1.0]), outer([1.0, 0, 0], [2.0, 0])
    base = torch.zeros(3, 2)
    out = run([d1, d2], base, **{**OFF, "shared_space": True, "max_rank": 1, "residual_weight": 0.5,
                                 "residual_rank": 1})
    assert out.info["rank"] == 1
    assert torch.allclose(out.tensor, outer([1.0, 0, 0], [5.0, 0]) + 0.5 * outer([0, 1.0, 0], [0, 1.0]), atol=1e-5)


def test_residual_rank_drops_the_weaker_residual_directions():
    # e1 is shared; d1's residual 2 e2 x e2 + 1 e3 x e3 truncated to rank 1 keeps only e2.
    d1 = torch.diag(T([4.0, 2.0, 1.0]))
    d2 = torch.diag(T([4.0, 0.0, 0.0]))
    out = run([d1, d2], torch.zeros(3, 3), **{**OFF, "shared_space": True, "max_rank": 1,
                                              "residual_weight": 1.0, "residual_rank": 1})
    assert torch.allclose(out.tensor, torch.diag(T([8.0, 2.0, 0.0])), atol=1e-5)


# --- filtering -------------------------------------------------------------

def test_filtering_suppresses_cancelling_rows_without_shared_space():
    # row 0: [1,0] vs [-1,0] cancel (conflict 1); row 1: [0,2] and [0,1] agree (conflict 0)
    d1, d2 = T([[1.0, 0.0], [0.0, 2.0]]), T([[-1.0, 0.0], [0.0, 1.0]])
    out = run([d1, d2], torch.zeros(2, 2), **{**OFF, "filtering": True})
    assert torch.allclose(out.tensor, T([[0.0, 0.0], [0.0, 3.0]]))
    assert out.info["directions_suppressed"] == 1


def test_filtering_is_off_unless_asked():
    d1, d2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    off = {k: v for k, v in OFF.items() if k != "filtering"}
    out = run([d1, d2], torch.zeros(2, 2), **off)
    assert out.info["directions_suppressed"] == 0
    assert torch.allclose(out.tensor, d1 + d2)


def test_filtering_in_the_shared_basis():
    # e1 carries a (expert 1) and -a (expert 2): suppressed; e2 carries b from both: kept.
    a, b = [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]
    d1 = outer([1.0, 0], a) + outer([0, 1.0], b)
    d2 = -outer([1.0, 0], a) + outer([0, 1.0], b)
    out = run([d1, d2], torch.zeros(2, 3), **{**OFF, "shared_space": True, "energy": 1.0, "filtering": True})
    assert torch.allclose(out.tensor, 2 * outer([0, 1.0], b), atol=1e-5)
    assert out.info["directions_suppressed"] == 1


def test_conflict_threshold_decides_partial_conflicts():
    # rows [2,0] and [-1,0]: |sum| / sum|.| = 1/3, conflict 2/3
    d1, d2 = T([[2.0, 0.0]]), T([[-1.0, 0.0]])
    kept = run([d1, d2], torch.zeros(1, 2), **{**OFF, "filtering": True, "conflict_threshold": 0.7})
    dropped = run([d1, d2], torch.zeros(1, 2), **{**OFF, "filtering": True, "conflict_threshold": 0.6})
    assert torch.allclose(kept.tensor, T([[1.0, 0.0]])) and torch.allclose(dropped.tensor, torch.zeros(1, 2))


# --- layer weighting ---------------------------------------------------------

def test_weight_mode_uses_shared_energy_shares():
    # d1 = 2 e1 x v (energy 4) lies in the shared space kept at energy 0.75; d2 = e2 x v (energy 1) does not.
    # shares [1, 0] -> expert weights 2 * [1, 0] / 1 = [2, 0]; score 0.5 -> lambda 0.5 + 0.5 * 0.5
    v = [1.0, 1.0]
    d1, d2 = outer([2.0, 0], v), outer([0, 1.0], v)
    out = run([d1, d2], torch.zeros(2, 2), **{**OFF, "shared_space": True, "energy": 0.75,
                                              "residual_weight": 0.0, "layer_weighting": "weight"})
    assert out.info["expert_weights"] == pytest.approx([2.0, 0.0])
    assert out.info["layer_score"] == pytest.approx(0.5) and out.info["scale"] == pytest.approx(0.75)
    assert torch.allclose(out.tensor, 0.75 * 2 * d1, atol=1e-5)


def test_data_mode_uses_alignment_scores():
    base, models = experts(k=2)
    out = run(models, base, **{**OFF, "layer_weighting": "data", "alignment": [1.0, 0.5],
                               "lambda_min": 0.2, "lambda_max": 1.0})
    # weights 2 * [1, .5] / 1.5; score .75 -> lambda .2 + .8 * .75 = .8
    expected = base + 0.8 * (4 / 3 * (models[0] - base) + 2 / 3 * (models[1] - base))
    assert torch.allclose(out.tensor, expected, atol=1e-5)
    assert out.info["scale"] == pytest.approx(0.8)


# --- calibration Gram matrices and the whole-update spectrum ------------------

def _grams(k, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(20, n, generator=g) for _ in range(k)]
    return [x.T @ x for x in xs]


def test_equal_grams_give_the_weighted_mean():
    # The gram combine is a mean: equal Grams give the plain sum's update over the weights' sum (3.5),
    # shared part and residuals alike; without the shared space, sum_k w_k d_k / sum_k w_k.
    base, models = experts()
    gram = _grams(1, 5)[0]
    weights = [1.0, 0.5, 2.0]
    shared = {**OFF, "shared_space": True, "energy": 0.5}
    out = run(models, base, weights, combine="gram", grams=[gram] * 3, **shared)
    plain = run(models, base, weights, **shared)
    assert torch.allclose(out.tensor - base, (plain.tensor - base) / 3.5, atol=1e-4)
    out = run(models, base, weights, combine="gram", grams=[gram] * 3, **OFF)
    mean = base + sum(w * (m - base) for w, m in zip(weights, models)) / 3.5
    assert torch.allclose(out.tensor, mean, atol=1e-4)


def test_gram_combine_gives_a_matrix_without_grams_the_weighted_mean():
    # An embedding has no input Grams: under the gram combine it takes the weighted mean of the deltas
    # (RegMean's choice), not their sum, which at the data mode's scale 1 was 3.5 times that update here.
    base, models = experts()
    weights = [1.0, 0.5, 2.0]
    out = run(models, base, weights, combine="gram", **OFF)
    mean = base + sum(w * (m - base) for w, m in zip(weights, models)) / 3.5
    assert torch.allclose(out.tensor, mean, atol=1e-5)
    assert out.info["combine"] == "sum"


def test_grams_with_everything_off_is_regmean_on_the_deltas():
    # (sum_k d_k G_k)(sum_k G_k)^-1 at scale 1 is RegMean exactly:
    # W0 + sum_k (W_k - W0) G_k (sum G)^-1 = (sum_k W_k G_k)(sum G)^-1.
    base, models = experts()
    grams = _grams(3, 5)
    out = run(models, base, combine="gram", grams=grams, gram_alpha=0.9, lambda_max=1.0, **OFF)
    assert torch.allclose(out.tensor, other("regmean", models, None, grams=grams, alpha=0.9), atol=1e-4)
    assert out.info["combine"] == "gram"


def test_gram_combine_by_hand_with_weights_and_scale():
    # Diagonal Grams make the solve per input column: column j of the update is
    # sum_k w_k d_k[:, j] g_k[j] / sum_k w_k g_k[j], then times the scale (0.5).
    base = torch.zeros(2, 2)
    models = [T([[1.0, 2.0], [0.0, 4.0]]), T([[3.0, 0.0], [2.0, -4.0]])]
    grams = [torch.diag(T([1.0, 3.0])), torch.diag(T([2.0, 1.0]))]
    out = run(models, base, [1.0, 2.0], combine="gram", grams=grams, gram_alpha=1.0, lambda_max=0.5, **OFF)
    col0 = (1 * 1 * T([1.0, 0.0]) + 2 * 2 * T([3.0, 2.0])) / (1 * 1 + 2 * 2)  # [13/5, 8/5]
    col1 = (1 * 3 * T([2.0, 4.0]) + 2 * 1 * T([0.0, -4.0])) / (1 * 3 + 2 * 1)  # [6/5, 4/5]
    assert torch.allclose(out.tensor, 0.5 * torch.stack([col0, col1], dim=1), atol=1e-6)


def test_merged_inputs_fit_every_expert_on_the_merged_models_inputs():
    # gram_inputs: merged, scale 1, everything else off: the least-squares W minimising
    # sum_k ||X~_k W^T - X_k W_k^T||^2 (merged inputs X~_k, expert inputs X_k), solved here by lstsq.
    base, models = experts()
    g = torch.Generator().manual_seed(3)
    own = [torch.randn(40, 5, generator=g, dtype=torch.float64) for _ in models]
    merged_in = [x + 0.3 * torch.randn(40, 5, generator=g, dtype=torch.float64) for x in own]
    measured = dict(grams=[x.T @ x for x in merged_in], cross_grams=[x.T @ xm for x, xm in zip(own, merged_in)])
    out = run(models, base, combine="gram", gram_inputs="merged", expert_target="own_inputs", gram_alpha=1.0,
              lambda_max=1.0, **measured, **OFF)
    lhs = torch.cat(merged_in)
    rhs = torch.cat([x @ w.double().T for x, w in zip(own, models)])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(out.tensor.double(), expected, atol=1e-4)
    assert out.info["combine"] == "gram (merged inputs)"
    # expert_target: merged_inputs (RegMean++ as published): each expert's weights matched on X~_k.
    published = run(models, base, combine="gram", gram_inputs="merged", gram_alpha=1.0, lambda_max=1.0,
                    **measured, **OFF)
    rhs = torch.cat([x @ w.double().T for x, w in zip(merged_in, models)])
    assert torch.allclose(published.tensor.double(), torch.linalg.lstsq(lhs, rhs).solution.T, atol=1e-4)
    assert published.info["combine"] == "gram"


def test_merged_inputs_equal_to_the_experts_give_regmean():
    base, models = experts()
    grams = _grams(3, 5)
    params = dict(combine="gram", gram_alpha=0.9, lambda_max=1.0, grams=grams, **OFF)
    out = run(models, base, gram_inputs="merged", expert_target="own_inputs", cross_grams=grams, **params)
    assert torch.allclose(out.tensor, run(models, base, **params).tensor, atol=1e-4)


def test_grams_count_only_under_combine_gram():
    base, models = experts()
    ignored = run(models, base, grams=_grams(3, 5), lambda_max=1 / 3, **OFF)
    assert torch.allclose(ignored.tensor, run(models, base, lambda_max=1 / 3, **OFF).tensor)
    assert ignored.info["combine"] == "sum"


def test_flatten_total_flattens_the_update_with_its_residuals():
    base, models = experts()
    params = {**OFF, "shared_space": True, "energy": 0.5, "residual_weight": 0.5}
    kept = run(models, base, **params).tensor - base
    out = run(models, base, **{**params, "spectrum": "flatten_total"}).tensor - base
    u, s, vh = torch.linalg.svd(kept, full_matrices=False)
    assert torch.allclose(out, (u * s.mean()) @ vh, atol=1e-4)


@pytest.mark.parametrize("alignment, match", [(None, "needs alignment"), ([1.0], "2 scores"), ([1.0, 1.5], r"\[0, 1\]")])
def test_data_mode_rejects_missing_or_bad_alignment(alignment, match):
    base, models = experts(k=2)
    with pytest.raises(ValueError, match=match):
        run(models, base, layer_weighting="data", alignment=alignment)


# --- vectors, pivots, shapes -------------------------------------------------

def test_vectors_take_a_sign_consistent_mean():
    d1, d2 = T([1.0, -2.0, 0.0]), T([3.0, 1.0, 0.0])
    # elected signs + - +: entry 0 mean (1+3)/2, entry 1 only -2, entry 2 nothing
    out = run([d1, d2], torch.zeros(3), layer_weighting="uniform")
    assert torch.allclose(out.tensor, T([2.0, -2.0, 0.0]))


def test_vectors_in_weight_mode_weight_experts_by_agreeing_mass():
    d1, d2 = T([1.0, -2.0, 0.0]), T([3.0, 1.0, 0.0])
    # agreeing mass: d1 3/3, d2 3/4 -> weights 2 * [1, .75] / 1.75 = [8/7, 6/7]; score .875, lambda .9375
    out = run([d1, d2], torch.zeros(3), layer_weighting="weight")
    assert out.info["expert_weights"] == pytest.approx([8 / 7, 6 / 7])
    assert torch.allclose(out.tensor, 0.9375 * T([(8 / 7 + 18 / 7) / 2, -2.0, 0.0]))


def test_no_base_pivots_on_the_experts_mean():
    _, models = experts(k=3)
    mean = sum(models) / 3
    out = run(models, None, **OFF)  # deltas from the mean sum to zero
    assert torch.allclose(out.tensor, mean, atol=1e-5)
    assert get_method("pivotmerge").base == "optional"


def test_one_model_zero_deltas_and_higher_rank_tensors():
    base, (model,) = experts(k=1)
    assert torch.allclose(run([model], base, energy=1.0, layer_weighting="uniform", filtering=False,
                              spectrum="keep").tensor, model, atol=1e-5)
    for params in ({}, {"shared_space": False}, {"svd": "randomized", "max_rank": 2}):
        out = run([base.clone(), base.clone()], base, **params)
        assert torch.equal(out.tensor, base)
    kernels = [torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    conv = run(kernels, torch.zeros(4, 2, 3, 3), **OFF).tensor
    assert torch.allclose(conv, kernels[0] + kernels[1], atol=1e-5)


def test_randomized_svd_is_seeded_and_needs_a_rank():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(30, 20, generator=g)
    models = [base + torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g) for _ in range(2)]
    params = dict(max_rank=4, energy=1.0, layer_weighting="uniform")
    exact = run(models, base, **params).tensor
    r1 = run(models, base, generator=torch.Generator().manual_seed(1), svd="randomized", **params).tensor
    r2 = run(models, base, generator=torch.Generator().manual_seed(1), svd="randomized", **params).tensor
    assert torch.equal(r1, r2) and torch.allclose(r1, exact, atol=1e-3)
    with pytest.raises(pydantic.ValidationError, match="max_rank"):
        get_method("pivotmerge").params.model_validate({"svd": "randomized"})
