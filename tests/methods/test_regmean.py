"""RegMean: the closed form, the Gram matrices it takes, and the registered method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pivotmerge.data.calibration import GramCollector, collect_grams
from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.example import make_example
from pivotmerge.methods import Calibration, get_method
from pivotmerge.methods.regmean import regmean_solve


def test_two_by_two_case_computed_by_hand():
    g1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    g2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # alpha 0.5: G~1 = [[2, .5], [.5, 2]]; sum G~ = [[3, .5], [.5, 5]] (det 14.75);
    # sum W G~ = [2, .5] + [0, 3] = [2, 3.5]; W = [2, 3.5] [[5, -.5], [-.5, 3]] / 14.75.
    merged = regmean_solve([w1, w2], [g1, g2], [1.0, 1.0], alpha=0.5)
    assert torch.allclose(merged, torch.tensor([[8.25, 9.5]]) / 14.75, atol=1e-6)


def test_alpha_one_is_the_least_squares_fit_to_every_expert_on_its_inputs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in xs]
    # min_W sum_k ||X_k W^T - X_k W_k^T||^2, solved as one stacked least-squares problem.
    x = torch.cat(xs)
    y = torch.cat([xk @ wk.T for xk, wk in zip(xs, ws)])
    expected = torch.linalg.lstsq(x, y).solution.T
    merged = regmean_solve(ws, [xk.T @ xk for xk in xs], [1.0, 1.0], alpha=1.0)
    assert torch.allclose(merged, expected, atol=1e-10)
    # Weights scale each expert's squared error: weight 2 is the expert's inputs counted twice.
    doubled = torch.linalg.lstsq(torch.cat([x, xs[0]]), torch.cat([y, xs[0] @ ws[0].T])).solution.T
    assert torch.allclose(regmean_solve(ws, [xk.T @ xk for xk in xs], [2.0, 1.0], alpha=1.0), doubled, atol=1e-10)


def _inputs_seen_by_the_merged_model() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], Calibration]:
    """Each expert's own inputs X_k, the merged model's X~_k on the same data, weights W_k, and the calibration
    the engine measures for ``gram_inputs: merged`` (Grams of X~_k, cross Grams X_k^T X~_k)."""
    g = torch.Generator().manual_seed(1)
    own = [torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)]
    seen = [x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in own]
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in own]
    return own, seen, ws, Calibration(grams=[x.T @ x for x in seen], cross_grams=[x.T @ xs for x, xs in zip(own, seen)])


def test_merged_inputs_are_regmean_plus_plus_as_published():
    # RegMean++ (Nguyen et al., 2025): min_W sum_k ||X~_k W^T - X~_k W_k^T||^2, X~_k the merged model's
    # inputs on expert k's data, i.e. RegMean's formula on their Grams; the cross Grams are not read.
    _, seen, ws, data = _inputs_seen_by_the_merged_model()
    expected = torch.linalg.lstsq(torch.cat(seen), torch.cat([x @ w.T for x, w in zip(seen, ws)])).solution.T
    method = get_method("regmean")
    params = method.params.model_validate({"alpha": 1.0, "gram_inputs": "merged"})
    assert params.expert_target == "merged_inputs"
    out = method(ws, None, [1.0, 1.0], params, None, data)
    assert torch.allclose(out.tensor, expected, atol=1e-10)
    assert out.info == {"regmean": True, "inputs": "merged"}


def test_own_input_targets_fit_each_experts_outputs_on_its_own_inputs():
    # expert_target: own_inputs: min_W sum_k ||X~_k W^T - X_k W_k^T||^2 (the outputs each expert gives on its
    # own data, reached from the merged model's inputs).
    own, seen, ws, data = _inputs_seen_by_the_merged_model()
    expected = torch.linalg.lstsq(torch.cat(seen), torch.cat([x @ w.T for x, w in zip(own, ws)])).solution.T
    method = get_method("regmean")
    params = method.params.model_validate({"alpha": 1.0, "gram_inputs": "merged", "expert_target": "own_inputs"})
    out = method(ws, None, [1.0, 1.0], params, None, data)
    assert torch.allclose(out.tensor, expected, atol=1e-10)
    assert out.info == {"regmean": True, "inputs": "merged"}
    # With the experts' own Grams (gram_inputs: expert) the target has nothing to choose: RegMean either way.
    grams = Calibration(grams=[x.T @ x for x in own])
    plain = [method(ws, None, [1.0, 1.0], method.params.model_validate({"alpha": 1.0, "expert_target": t}), None,
                    grams).tensor for t in ("merged_inputs", "own_inputs")]
    assert torch.equal(plain[0], plain[1])
    with pytest.raises(ValueError, match="expert_target"):
        method.params.model_validate({"expert_target": "merged"})
    # Cross Grams equal to the Grams (the merged model sees what each expert saw) give RegMean back.
    grams = [x.T @ x for x in own]
    assert torch.allclose(regmean_solve(ws, grams, [1.0, 1.0], 0.7, cross_grams=grams), regmean_solve(ws, grams, [1.0, 1.0], 0.7))


def test_identical_inputs_and_diagonal_grams_reduce_to_the_mean():
    ws = [torch.randn(3, 4), torch.randn(3, 4)]
    gram = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(regmean_solve(ws, [gram, gram], [1.0, 1.0], alpha=0.3), (ws[0] + ws[1]) / 2, atol=1e-6)


def test_registered_method_uses_grams_for_matrices_and_averages_the_rest():
    method = get_method("regmean")
    ws = [torch.randn(3, 2), torch.randn(3, 2)]
    grams = [torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])]
    params = method.params.model_validate({"alpha": 0.5})
    out = method(ws, None, [1.0, 1.0], params, None, Calibration(grams=grams))
    assert out.info == {"regmean": True, "inputs": "expert"}
    assert torch.allclose(out.tensor, regmean_solve(ws, grams, [1.0, 1.0], 0.5))
    assert "grams" not in params.model_dump()  # never written into the merge report
    bias = method([torch.ones(3), torch.zeros(3)], None, [3.0, 1.0], params, None, Calibration(grams=grams))
    assert torch.allclose(bias.tensor, torch.full((3,), 0.75)) and bias.info == {"regmean": False}
    with pytest.raises(ValueError, match="grams: expected one 2-D tensor per expert"):
        Calibration(grams=[[1.0, 2.0]])


def test_hooks_sum_x_transpose_x_without_padding():
    layer = nn.Linear(3, 2)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with GramCollector({"l.weight": layer}) as collector:
        collector.token_mask = mask
        layer(x)
        layer(x)  # sums over batches
    kept = x[mask].double()
    assert torch.allclose(collector.grams["l.weight"], 2 * kept.T @ kept)
    assert collector.rows["l.weight"] == 12 and collector.grams["l.weight"].dtype == torch.float64
    layer(x)
    assert collector.rows["l.weight"] == 12  # hooks removed on exit


def test_grams_of_a_llava_projector_on_calibration_images(tmp_path):
    ex = make_example(tmp_path / "ex", n_experts=1, with_data=True, n_samples=3)
    data = load_dataset(ex.datasets["shapes"])
    names = ["model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias",
             "model.language_model.layers.0.mlp.up_proj.weight"]
    grams = collect_grams(ex.base, data, names, device="cpu", batch_size=2)
    assert set(grams) == {names[0], names[2]}  # the bias is no linear layer's weight
    assert grams[names[0]].shape == (32, 32) and grams[names[2]].shape == (64, 64)
    for g in grams.values():
        assert torch.allclose(g, g.T) and torch.linalg.eigvalsh(g).min() > -1e-8


@pytest.mark.parametrize("method, name", [("regmean", "grams"), ("pivotmerge", "alignment"), ("pivotmerge", "grams")])
def test_engine_set_parameters_are_rejected_in_a_spec_naming_the_field(method, name):
    from pivotmerge.errors import SpecError
    from pivotmerge.spec.schema import spec_from_dict

    assert name in get_method(method).engine_params
    spec = {"method": method, "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(SpecError) as exc:
        spec_from_dict({**spec, "parameters": {name: [1.0, 1.0]}})
    assert str(exc.value) == f"parameters.{name}: set by the engine from calibration data, not by the spec"
    spec["models"][1]["parameters"] = {name: [1.0]}
    with pytest.raises(SpecError, match=rf"^models\.1\.parameters\.{name}: set by the engine"):
        spec_from_dict(spec)
