"""ProDistill, layer-wise AdaMerging and PivotMerge's alignment fit on a linear block, against hand computations.

A block here is ``y = x W^T + b``; expert k's teacher outputs are its own block on its own inputs X_k,
the student sees other inputs X~_k (the merged model's features): ProDistill's dual inputs. One Adam step
from a start moves every trained value by ``-lr * sign(gradient)`` (Adam's first step), so the merged
tensors after one step follow from the loss gradient written out by hand.
"""

from __future__ import annotations

import pytest
import torch

from pivotmerge.methods import Block, get_method
from pivotmerge.methods.adamerging import combine
from pivotmerge.methods.alignment import aligned_tensors
from pivotmerge.methods.toolkit.distillation import caption_kl, feature_loss

K, OUT, IN, ROWS = 2, 3, 4, 5


def _linear(tensors, k, b, x):
    return x @ tensors["w"].T + tensors["b"]


@pytest.fixture
def world():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(OUT, IN, generator=g), "b": torch.randn(OUT, generator=g)}
    experts = [{n: t + 0.5 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(K)]
    own = [torch.randn(ROWS, IN, generator=g) for _ in range(K)]
    seen = [x + 0.1 * torch.randn(x.shape, generator=g) for x in own]
    targets = [_linear(e, k, 0, x) for k, (e, x) in enumerate(zip(experts, own))]
    block = Block(
        path="proj",
        names=("w", "b"),
        forward=_linear,
        student_inputs=[[x] for x in seen],
        teacher_inputs=[[x] for x in own],
        teacher_outputs=[[y] for y in targets],
    )
    return base, experts, seen, targets, block


def _gradient(theta, seen, targets):
    """d/dtheta of sum_k mean_rows ||X~_k W^T + b - Y_k||^2, by hand."""
    gw, gb = torch.zeros_like(theta["w"]), torch.zeros_like(theta["b"])
    for x, y in zip(seen, targets):
        r = x @ theta["w"].T + theta["b"] - y
        gw += 2 / x.shape[0] * r.T @ x
        gb += 2 / x.shape[0] * r.sum(0)
    return {"w": gw, "b": gb}


def test_feature_loss_is_each_experts_output_error_on_its_own_samples(world):
    base, experts, seen, targets, block = world
    expected = sum(((x @ base["w"].T + base["b"] - y) ** 2).sum() / ROWS for x, y in zip(seen, targets))
    assert torch.allclose(feature_loss(block, base), expected)
    # expert weights scale each expert's term
    first = ((seen[0] @ base["w"].T + base["b"] - targets[0]) ** 2).sum() / ROWS
    assert torch.allclose(feature_loss(block, base, [1.0, 0.0]), first)


def test_prodistill_starts_at_init_scale_and_takes_elementwise_adam_steps(world):
    base, experts, seen, targets, block = world
    method = get_method("prodistill")
    start = {n: base[n] + 0.3 * sum(e[n] - base[n] for e in experts) for n in base}
    for n in base:
        assert torch.allclose(method([e[n] for e in experts], base[n], [1.0, 1.0], method.params()).tensor, start[n])
    zero = method.fit_block(experts, base, start, [1.0, 1.0], method.params(steps=0), block)
    assert all(torch.allclose(zero[n].tensor, start[n]) for n in base)

    lr = 0.01
    one = method.fit_block(experts, base, start, [1.0, 1.0], method.params(steps=1, learning_rate=lr), block)
    grad = _gradient(start, seen, targets)
    for n in base:  # alpha_k <- 0.3 - lr sign(tau_k * dL/dtheta), entry by entry
        taus = [e[n] - base[n] for e in experts]
        expected = base[n] + sum((0.3 - lr * torch.sign(t * grad[n])) * t for t in taus)
        assert torch.allclose(one[n].tensor, expected, atol=1e-5)
    assert one["w"].info["loss_end"] < one["w"].info["loss_start"]


def test_adamerging_merged_weights_are_fusionbench_layer_wise_formula():
    # FusionBench's LayerWiseMergedModel.merge_weights: theta_j = theta0_j + sum_k clamp(w_kj, 0, 1) tau_kj
    base = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    taus = {
        "a": [torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0])],
        "b": [torch.tensor([[4.0]]), torch.tensor([[-2.0]])],
    }
    coefficients = torch.tensor([[0.3, 1.5], [-0.2, 0.5]])  # experts x tensors
    merged = combine(base, taus, coefficients, ["a", "b"], clamp=True)
    assert torch.allclose(merged["a"], torch.tensor([1.0 + 0.3 * 1 + 0 * 2, 2.0 - 0.3]))
    assert torch.allclose(merged["b"], torch.tensor([[0.5 + 1.0 * 4 + 0.5 * -2]]))
    unclamped = combine(base, taus, coefficients, ["a", "b"], clamp=False)
    assert torch.allclose(unclamped["a"], torch.tensor([1.0 + 0.3 - 0.4, 2.0 - 0.3]))


def test_adamerging_matches_fusion_benchs_layer_wise_merged_model():
    # Where the two overlap: FusionBench's LayerWiseMergedModel (one coefficient per parameter tensor and expert,
    # clamped to [0, 1]) trained by Adam on a loss of its merged weights, and our fit_block on the same loss (the
    # features objective of a two-layer block). Coefficients and merged weights agree after several steps.
    from copy import deepcopy

    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel
    from torch import nn
    from torch.func import functional_call

    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    finetuned = [deepcopy(pretrained) for _ in range(K)]
    with torch.no_grad():
        for m in finetuned:
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape))
    names = [n for n, _ in pretrained.named_parameters()]
    state = [dict(m.named_parameters()) for m in (pretrained, *finetuned)]
    base, experts = {n: state[0][n].detach().clone() for n in names}, [
        {n: st[n].detach().clone() for n in names} for st in state[1:]]
    own = [torch.randn(ROWS, 4) for _ in range(K)]
    seen = [x + 0.1 * torch.randn(x.shape) for x in own]

    def run(tensors, k, b, x):
        return functional_call(pretrained, dict(tensors), (x,))

    targets = [run(e, k, 0, x).detach() for k, (e, x) in enumerate(zip(experts, own))]
    block = Block(path="m", names=tuple(names), forward=run, student_inputs=[[x] for x in seen],
                  teacher_inputs=[[x] for x in own], teacher_outputs=[[y] for y in targets])
    lr, steps = 0.05, 4
    theirs = LayerWiseMergedModel(torch.full((K, len(names)), 0.3), deepcopy(pretrained),
                                  [deepcopy(m) for m in finetuned], clamp_weights=True)
    optimiser = torch.optim.Adam([theirs.merge_weight], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = feature_loss(block, theirs.merge_weights())
        loss.backward()
        optimiser.step()
    fused = {n: t.detach() for n, t in theirs.merge_weights().items()}
    method = get_method("adamerging")
    ours = method.fit_block(experts, base, base, [1.0] * K, method.params(objective="features", steps=steps,
                                                                          learning_rate=lr), block)
    for j, n in enumerate(names):
        assert ours[n].info["coefficients"] == pytest.approx(theirs.merge_weight.detach().clamp(0, 1)[:, j].tolist(),
                                                            abs=1e-6)
        assert torch.allclose(ours[n].tensor, fused[n], atol=1e-6)
    assert ours[names[0]].info["loss_end"] < ours[names[0]].info["loss_start"]


def test_adamerging_takes_one_coefficient_step_per_tensor_and_expert(world):
    base, experts, seen, targets, block = world
    method = get_method("adamerging")
    lr = 0.05
    params = method.params(objective="features", steps=1, learning_rate=lr)
    start = {n: base[n] + 0.3 * sum(e[n] - base[n] for e in experts) for n in base}
    out = method.fit_block(experts, base, start, [1.0, 1.0], params, block)
    grad = _gradient(start, seen, targets)
    for n in base:
        taus = [e[n] - base[n] for e in experts]
        expected = base[n] + sum((0.3 - lr * torch.sign((t * grad[n]).sum())) * t for t in taus)
        assert torch.allclose(out[n].tensor, expected, atol=1e-5)
        assert out[n].info["coefficients"] == pytest.approx(
            [0.3 - lr * float(torch.sign((t * grad[n]).sum())) for t in taus]
        )


def test_caption_kl_is_the_temperature_scaled_kl_of_each_expert_to_the_merged_model():
    teacher = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])]
    student = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 1.0]])]
    block = Block(
        path="m",
        names=(),
        forward=_linear,
        student_inputs=[],
        teacher_inputs=[],
        teacher_outputs=[],
        caption_logits=lambda tensors, k: student[k],
        teacher_logits=teacher,
    )
    t = 2.0
    expected = torch.zeros(())
    for p_logits, q_logits in zip(teacher, student):
        p, q = torch.softmax(p_logits / t, -1), torch.softmax(q_logits / t, -1)
        expected += t * t * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(caption_kl(block, {}, temperature=t), expected)


def test_pivotmerge_alignment_fit_starts_at_the_closed_form(world):
    base, experts, seen, targets, block = world
    method = get_method("pivotmerge")
    start = {n: base[n] + 0.25 * sum(e[n] - base[n] for e in experts) for n in base}
    unchanged = method.fit_block(experts, base, start, [1.0, 1.0], method.params(distill_steps=0), block)
    assert all(torch.equal(unchanged[n].tensor, start[n]) for n in base)
    # coefficients: W = W_start + sum_k c_k (W_k - W_start), one c per tensor and expert
    trainables, merged = aligned_tensors(experts, start, ["w", "b"], "coefficients")
    trainables[0].copy_(torch.tensor([[0.5, 1.0], [0.25, 0.0]]))
    out = merged()
    assert torch.allclose(
        out["w"], start["w"] + 0.5 * (experts[0]["w"] - start["w"]) + 0.25 * (experts[1]["w"] - start["w"])
    )
    assert torch.allclose(out["b"], start["b"] + 1.0 * (experts[0]["b"] - start["b"]))
    lr = 1e-3
    fitted = method.fit_block(
        experts, base, start, [1.0, 1.0], method.params(distill_steps=1, distill_learning_rate=lr), block
    )
    grad = _gradient(start, seen, targets)
    for n in base:  # a free update of every entry: one Adam step is -lr sign(dL/dW)
        assert torch.allclose(fitted[n].tensor, start[n] - lr * torch.sign(grad[n]), atol=1e-6)


@pytest.mark.parametrize("name, params", [
    ("pivotmerge", {"distill_steps": 5, "distill_objective": "captions", "distill_parameters": "coefficients"}),
    ("pivotmerge", {"distill_steps": 5, "distill_objective": "captions"}),
    ("adamerging", {"objective": "captions", "steps": 5}),
])
def test_a_block_the_captions_do_not_reach_keeps_its_start(world, name, params):
    # A vision layer above the one LLaVA reads never reaches the captions: the objective does not depend on its
    # tensors (no gradient), so the fit leaves them where it starts instead of failing in backward().
    base, experts, _, _, block = world
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    unreached = Block(path="proj", names=("w", "b"), forward=_linear, student_inputs=[], teacher_inputs=[],
                      teacher_outputs=[], caption_logits=lambda tensors, k: logits, teacher_logits=[logits, logits])
    method = get_method(name)
    start = {n: base[n] + 0.5 * sum(e[n] - base[n] for e in experts) for n in base}
    out = method.fit_block(experts, base, start, [1.0, 1.0], method.params(**params), unreached)
    expected = start if name == "pivotmerge" else combine(base, {n: [e[n] - base[n] for e in experts] for n in base},
                                                          torch.full((K, 2), 0.3), ["w", "b"], True)
    assert all(torch.allclose(out[n].tensor, expected[n]) for n in base)
    assert next(iter(out.values())).info["loss_start"] == next(iter(out.values())).info["loss_end"] == 0.0


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("prodistill", {"steps": -1}, "steps"),
        ("prodistill", {"learning_rate": 0}, "learning_rate"),
        ("adamerging", {"objective": "entropy"}, "objective"),
        ("pivotmerge", {"distill_objective": "loss"}, "distill_objective"),
        ("pivotmerge", {"distill_steps": -3}, "distill_steps"),
    ],
)
def test_bad_parameters_name_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        get_method(name).params(**params)
