"""`gram_inputs: merged` (PivotMerge's, and RegMean's: RegMean++): the engine merges twice, the second time fitting each layer on the
inputs the first merge feeds it (RegMean++'s idea)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.data.datasets import Dataset, load_dataset
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
    merged = _weights(tmp_path / "out")
    grams, cross = [], []
    for expert, domain in zip(example.experts, OWN):
        data = load_dataset(example.datasets[domain])
        own, seen = _linear_2_inputs(expert, data), _linear_2_inputs(tmp_path / "first", data)
        grams.append(seen.T @ seen)
        cross.append(own.T @ seen)
    experts = [_weights(e)[W2] for e in example.experts]
    assert torch.allclose(merged[W2], regmean_solve(experts, grams, [1.0, 1.0], 0.8, cross_grams=cross), atol=1e-5)
    assert report.calibration.passes == 2


def test_report_and_progress_show_two_passes(example, tmp_path):
    # gram_inputs set for linear_2 only: still two passes, linear_1 fitted on the experts' own inputs.
    spec = _refit_spec(example, [{"filter": "linear_2", "value": "merged"}, {"value": "expert"}])
    seen: list[Progress] = []
    report = pivotmerge.merge(spec, tmp_path / "out", progress=seen.append)
    assert report.calibration.gram_inputs == "merged" and report.calibration.passes == 2
    layers = {e.tensor: e.info["combine"] for e in report.layers if "combine" in (e.info or {})}
    assert layers == {W1: "gram", W2: "gram (merged inputs)"}
    stages = list(dict.fromkeys((p.stage, p.message) for p in seen if p.message))
    assert stages == [("calibrate", "calibration data: shapes, dots"),
                      ("merge", "first pass: each layer fitted on the experts' own inputs"),
                      ("refit", "layer inputs of the first merge pass, beside each expert's own"),
                      ("merge", "second pass: each layer fitted on the first pass's inputs")]
    assert [(p.done, p.total) for p in seen if p.stage == "refit"] == [(0, 2), (1, 2), (2, 2)]
    assert seen[-1].stage == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the first pass's folder is gone


def test_one_pass_without_combine_gram(example, tmp_path):
    spec = _spec(example, "pivotmerge", parameters={"gram_inputs": "merged"})
    del spec["calibration"]  # combine: sum reads no data, so gram_inputs has nothing to refit
    report = pivotmerge.merge(spec, tmp_path / "out")
    assert report.calibration is None


def _cancel_after(seen: list[Progress], stage: str, done: int | None):
    """A cancel check that trips once a progress report of `stage` (with `done`, if given) has been seen."""
    return lambda: any(p.stage == stage and (done is None or p.done == done) for p in seen)


@pytest.mark.parametrize("stage, done, measured", [("merge", None, []), ("refit", 0, [0]), ("refit", 2, [0, 1, 2])],
                         ids=["first pass", "measuring", "second pass"])
def test_cancel_in_either_pass_leaves_nothing_beside_the_output(example, tmp_path, stage, done, measured):
    seen: list[Progress] = []
    outs = tmp_path / "outs"
    with pytest.raises(MergeCancelled):
        pivotmerge.merge(_refit_spec(example, "merged"), outs / "out", progress=seen.append,
                         should_cancel=_cancel_after(seen, stage, done))
    # How far it got: with every expert measured, the cancel came in the second pass.
    assert [p.done for p in seen if p.stage == "refit"] == measured
    assert list(outs.iterdir()) == []  # no output, no partial folder, no first-pass folder


def test_a_spec_cannot_set_cross_grams():
    spec = {"method": "pivotmerge", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"cross_grams": [1.0, 1.0]}}
    with pytest.raises(SpecError) as exc:
        pivotmerge.spec_from_dict(spec)
    assert str(exc.value) == "parameters.cross_grams: set by the engine from calibration data, not by the spec"
