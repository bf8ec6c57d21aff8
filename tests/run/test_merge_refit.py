"""`gram_inputs: merged` (PivotMerge's, and RegMean's: RegMean++): block after block in the model's order, each
block is fitted on the inputs the merged blocks below it (already refitted) feed it, then the model is merged with
those Grams (RegMean++'s order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.data import blocks
from pivotmerge.data.datasets import Dataset, load_dataset
from pivotmerge.data.example import make_example
from pivotmerge.errors import MergeCancelled, SpecError
from pivotmerge.data.evaluate import caption_batches, load_model
from pivotmerge.methods import Calibration, get_method
from pivotmerge.methods.regmean import regmean_solve
from pivotmerge.progress import Progress
from tests.run.test_merge_data import W1, _spec, example  # noqa: F401  (example is a fixture)

W2 = W1.replace("linear_1", "linear_2")
OWN = ["shapes", "dots"]  # each expert's own calibration domain
GRAM = {"combine": "gram", "gram_alpha": 0.8, "layer_weighting": "weight"}  # no alignment: the closed forms below


def _refit_spec(ex, gram_inputs: object) -> dict:
    spec = _spec(ex, "pivotmerge", parameters={**GRAM, "gram_inputs": gram_inputs})
    for entry, domain in zip(spec["models"], OWN):
        entry["calibration"] = {"dataset": str(ex.datasets[domain])}
    return spec


@torch.no_grad()
def _linear_2_inputs(model_dir: Path, data: Dataset) -> torch.Tensor:
    """The rows the projector's second layer sees on `data`, in float64 (image patches: no padding to drop)."""
    loaded = load_model(model_dir, "cpu")
    layer = next(m for n, m in loaded.model.named_modules() if n.endswith("multi_modal_projector.linear_2"))
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    (batch,) = caption_batches(loaded.processor, data.records, batch_size=len(data.records))
    loaded.model(**batch.inputs)
    handle.remove()
    return torch.cat(seen).double()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_second_pass_refits_linear_2_on_the_merged_linear_1_and_keeps_linear_1(example, tmp_path):
    first = tmp_path / "first"  # gram_inputs: expert is exactly the first pass
    pivotmerge.merge(_refit_spec(example, "expert"), first)
    report = pivotmerge.merge(_refit_spec(example, "merged"), tmp_path / "out")
    once, twice = _weights(first), _weights(tmp_path / "out")
    # linear_1's inputs come from the unmerged vision tower: the merge feeds it the experts' own inputs.
    assert torch.allclose(twice[W1], once[W1], atol=1e-5)
    assert (twice[W2] - once[W2]).abs().max() > 1e-3

    # linear_2 in closed form: each expert's outputs fitted on what the first pass's linear_1 feeds linear_2.
    grams, cross = [], []
    for expert, domain in zip(example.experts, OWN):
        data = load_dataset(example.datasets[domain])
        own, merged = _linear_2_inputs(expert, data), _linear_2_inputs(first, data)
        grams.append(merged.T @ merged)
        cross.append(own.T @ merged)
    method = get_method("pivotmerge")
    # The spec gives calibration data: the method's defaults with data, then the spec's values (gram_alpha is off_diagonal_scale).
    params = method.params.model_validate({**method.with_calibration, "off_diagonal_scale": 0.8, "layer_weighting": "weight",
                                           "gram_inputs": "merged"})
    experts = [_weights(e)[W2] for e in example.experts]
    expected = method(experts, _weights(example.base)[W2], [1.0, 1.0], params, None, Calibration(grams=grams, cross_grams=cross)).tensor
    assert torch.allclose(twice[W2], expected, atol=1e-5)
    layers = {e.tensor: e for e in report.layers}
    assert layers[W2].info["combine"] == "gram (merged inputs)"


def test_regmean_with_merged_inputs_is_regmean_plus_plus_end_to_end(example, tmp_path):
    spec = _refit_spec(example, "merged")
    spec.update(method="regmean", parameters={"alpha": 0.8, "gram_inputs": "merged"})
    first_spec = {**spec, "parameters": {"alpha": 0.8}}
    pivotmerge.merge(first_spec, tmp_path / "first")
    report = pivotmerge.merge(spec, tmp_path / "out")
    own_targets = {**spec, "parameters": {**spec["parameters"], "expert_target": "own_inputs"}}
    pivotmerge.merge(own_targets, tmp_path / "own")
    grams, cross = [], []
    for expert, domain in zip(example.experts, OWN):
        data = load_dataset(example.datasets[domain])
        own, seen = _linear_2_inputs(expert, data), _linear_2_inputs(tmp_path / "first", data)
        grams.append(seen.T @ seen)
        cross.append(own.T @ seen)
    experts = [_weights(e)[W2] for e in example.experts]
    # As published: each expert's weights on the merged inputs (RegMean's formula on their Grams).
    published = regmean_solve(experts, grams, [1.0, 1.0], 0.8)
    assert torch.allclose(_weights(tmp_path / "out")[W2], published, atol=1e-5)
    # expert_target: own_inputs: each expert's outputs on its own inputs, through the cross Grams.
    own_fit = regmean_solve(experts, grams, [1.0, 1.0], 0.8, cross_grams=cross)
    assert torch.allclose(_weights(tmp_path / "own")[W2], own_fit, atol=1e-5)
    assert not torch.allclose(published, own_fit, atol=1e-4)
    assert report.calibration.passes == 2


def test_only_the_own_inputs_target_runs_each_experts_block(example, tmp_path, monkeypatch):
    # The published target reads the merged inputs' Grams alone (Need.CROSS_GRAMS is not among its needs), so
    # the refit runs no expert's block; own_inputs runs it once per block, expert and batch for the cross Grams.
    runs = []
    real = blocks.functional_call
    monkeypatch.setattr(blocks, "functional_call", lambda *args, **kwargs: runs.append(1) or real(*args, **kwargs))
    spec = _refit_spec(example, "merged")
    spec.update(method="regmean", parameters={"alpha": 0.8, "gram_inputs": "merged"})
    pivotmerge.merge(spec, tmp_path / "published")
    assert runs == []
    spec["parameters"]["expert_target"] = "own_inputs"
    pivotmerge.merge(spec, tmp_path / "own")
    assert len(runs) == 2  # the projector block, once per expert (each calibration set is one batch)


def test_report_and_progress_show_the_block_refit(example, tmp_path):
    # gram_inputs set for linear_2 only: linear_1 stays fitted on the experts' own inputs.
    spec = _refit_spec(example, [{"filter": "linear_2", "value": "merged"}, {"value": "expert"}])
    seen: list[Progress] = []
    report = pivotmerge.merge(spec, tmp_path / "out", progress=seen.append)
    assert report.calibration.gram_inputs == "merged" and report.calibration.passes == 2
    assert report.calibration.refit_blocks == ["model.multi_modal_projector"]
    layers = {e.tensor: e.info["combine"] for e in report.layers if "combine" in (e.info or {})}
    assert layers == {W1: "gram", W2: "gram (merged inputs)"}
    stages = list(dict.fromkeys((p.stage, p.message) for p in seen if p.message))
    assert stages == [("calibrate", "calibration data: shapes, dots"),
                      ("calibrate", "each expert's block inputs on its own data"),
                      ("refit", "each block fitted on the merged blocks below it"),
                      ("merge", "second pass: each layer fitted on the merged model's inputs")]
    assert [(p.done, p.total) for p in seen if p.stage == "refit"] == [(0, 1), (1, 1)]
    assert seen[-1].stage == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing written beside the output


def test_one_pass_without_combine_gram(example, tmp_path):
    spec = _spec(example, "pivotmerge", parameters={"gram_inputs": "merged"})
    del spec["calibration"]  # combine: sum reads no data, so gram_inputs has nothing to refit
    report = pivotmerge.merge(spec, tmp_path / "out")
    assert report.calibration is None


def _cancel_after(seen: list[Progress], stage: str, done: int | None):
    """A cancel check that trips once a progress report of `stage` (with `done`, if given) has been seen."""
    return lambda: any(p.stage == stage and (done is None or p.done == done) for p in seen)


@pytest.mark.parametrize("stage, done, measured", [("calibrate", 1, []), ("refit", 0, [0]), ("refit", 1, [0, 1])],
                         ids=["experts' inputs", "refitting", "second pass"])
def test_cancel_in_either_pass_leaves_nothing_beside_the_output(example, tmp_path, stage, done, measured):
    seen: list[Progress] = []
    outs = tmp_path / "outs"
    with pytest.raises(MergeCancelled):
        pivotmerge.merge(_refit_spec(example, "merged"), outs / "out", progress=seen.append,
                         should_cancel=_cancel_after(seen, stage, done))
    # How far it got: with every block refitted, the cancel came in the second pass.
    assert [p.done for p in seen if p.stage == "refit"] == measured
    assert list(outs.iterdir()) == []  # no output, no partial folder, no first-pass folder


def test_a_spec_cannot_set_cross_grams():
    spec = {"method": "pivotmerge", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"cross_grams": [1.0, 1.0]}}
    with pytest.raises(SpecError) as exc:
        pivotmerge.spec_from_dict(spec)
    assert str(exc.value) == "parameters.cross_grams: set by the engine from calibration data, not by the spec"


# ----------------------------------------------------------------- a chain of two blocks: projector -> decoder layer 0

Q0 = "model.language_model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Experts that trained the projector and the language model: a merge of both is a chain of blocks."""
    return make_example(tmp_path_factory.mktemp("chain"), n_experts=2, seed=3, lm_experts=True, with_data=True,
                        n_samples=4)


@torch.no_grad()
def _inputs_of(model_dir: Path, data: Dataset, tensor: str) -> torch.Tensor:
    """The rows linear weight `tensor`'s layer sees on `data` (padding left out), in float64."""
    loaded = load_model(model_dir, "cpu")
    layer = next(m for n, m in loaded.model.named_modules() if f"{n}.weight" == tensor)
    (batch,) = caption_batches(loaded.processor, data.records, batch_size=len(data.records))
    mask = batch.inputs["attention_mask"].bool()
    seen: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        seen.append((x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])).double())

    handle = layer.register_forward_pre_hook(keep)
    loaded.model(**batch.inputs)
    handle.remove()
    return torch.cat(seen)


def _regmean_on(model_dir: Path, ex, tensor: str) -> torch.Tensor:
    """RegMean++'s closed form (as published) for `tensor` at off-diagonal scale 0.8, with the inputs model
    `model_dir` feeds it."""
    grams = []
    for domain in OWN:
        seen = _inputs_of(model_dir, load_dataset(ex.datasets[domain]), tensor)
        grams.append(seen.T @ seen)
    experts = [_weights(e)[tensor] for e in ex.experts]
    return regmean_solve(experts, grams, [1.0, 1.0], 0.8)


def test_each_block_is_fitted_on_the_merged_blocks_below_it(chain, tmp_path):
    spec = _refit_spec(chain, "merged")
    spec.update(method="regmean", parameters={"alpha": 0.8, "gram_inputs": "merged"},
                components=["projector", "language_model"])
    report = pivotmerge.merge(spec, tmp_path / "out")
    blocks = report.calibration.refit_blocks
    assert blocks.index("model.multi_modal_projector") < blocks.index("model.language_model.layers.0")
    merged = _weights(tmp_path / "out")
    # Block 1, the projector: linear_2 on what the merged linear_1 feeds it (the tower is not merged).
    assert torch.allclose(merged[W2], _regmean_on(tmp_path / "out", chain, W2), atol=1e-5)
    # Block 2, decoder layer 0: q_proj on what the merged model's final projector and embeddings feed it, i.e.
    # its Grams from the output model itself (its input norm is averaged, the same before and after the refit).
    assert torch.allclose(merged[Q0], _regmean_on(tmp_path / "out", chain, Q0), atol=1e-4)
    # Not what a two-pass refit gives: that fits layer 0 on a first pass's projector (fitted on expert inputs).
    first = tmp_path / "first"
    pivotmerge.merge({**spec, "parameters": {"alpha": 0.8}}, first)
    assert not torch.allclose(merged[Q0], _regmean_on(first, chain, Q0), atol=1e-4)
