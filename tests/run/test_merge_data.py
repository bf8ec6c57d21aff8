"""The engine uses calibration data (RegMean, PivotMerge data weights) and evaluates the merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.data.calibration import collect_grams
from pivotmerge.data.datasets import load_dataset
from pivotmerge.errors import SpecError
from pivotmerge.data.example import make_example
from pivotmerge.methods import get_method
from pivotmerge.methods.regmean import regmean_solve
from pivotmerge.report.merge_report import read_report

W1 = "model.multi_modal_projector.linear_1.weight"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("ex"), n_experts=2, seed=2, with_data=True, n_samples=4)


def _spec(ex, method, **extra):
    return {"method": method, "base_model": str(ex.base), "models": [{"model": str(e)} for e in ex.experts],
            "components": ["projector"], "device": "cpu",
            "calibration": {"dataset": str(ex.datasets["shapes"])}, **extra}


def test_regmean_merge_uses_each_experts_grams_and_reports_metrics(example, tmp_path):
    spec = _spec(example, "regmean", parameters={"alpha": 0.8},
                 evaluate=[{"name": "dots", "dataset": str(example.datasets["dots"])}])
    report = pivotmerge.merge(spec, tmp_path / "out")
    data = load_dataset(example.datasets["shapes"])
    grams = [collect_grams(e, data, [W1], device="cpu")[W1] for e in example.experts]
    weights = [load_file(e / "model.safetensors")[W1] for e in example.experts]
    merged = load_file(tmp_path / "out" / "model.safetensors")[W1]
    assert torch.allclose(merged, regmean_solve(weights, grams, [1.0, 1.0], 0.8), atol=1e-5)
    assert W1 in report.calibration.gram_tensors
    (metrics,) = report.evaluation["merged"]
    assert metrics.dataset == "dots" and metrics.samples == 4 and metrics.caption_loss > 0
    assert read_report(tmp_path / "out") == report
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["evaluation"]["merged"] == [metrics.model_dump()]


def test_pivotmerge_data_weighting_receives_alignment_scores(example, tmp_path):
    report = pivotmerge.merge(_spec(example, "pivotmerge", parameters={"layer_weighting": "data"}), tmp_path / "out")
    scores = report.calibration.alignment.scores
    assert set(scores) == {"projector.1", "projector.2"} and all(len(s) == 2 for s in scores.values())
    entry = next(e for e in report.layers if e.tensor == W1)
    assert entry.params["alignment"] == scores["projector.1"]


def test_data_driven_methods_need_calibration(example, tmp_path):
    spec = _spec(example, "regmean")
    del spec["calibration"]
    with pytest.raises(SpecError, match="calibration"):
        pivotmerge.merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_regmean_takes_each_experts_grams_on_its_own_calibration_set(example, tmp_path):
    own = ["shapes", "dots"]
    spec = _spec(example, "regmean", parameters={"alpha": 0.8})
    for entry, domain in zip(spec["models"], own):
        entry["calibration"] = {"dataset": str(example.datasets[domain])}
    report = pivotmerge.merge(spec, tmp_path / "out")
    data = {d: load_dataset(example.datasets[d]) for d in own}
    weights = [load_file(e / "model.safetensors")[W1] for e in example.experts]
    own_grams = [collect_grams(e, data[d], [W1], device="cpu")[W1] for e, d in zip(example.experts, own)]
    shared_grams = [collect_grams(e, data["shapes"], [W1], device="cpu")[W1] for e in example.experts]
    merged = load_file(tmp_path / "out" / "model.safetensors")[W1]
    assert torch.allclose(merged, regmean_solve(weights, own_grams, [1.0, 1.0], 0.8), atol=1e-5)
    shared = regmean_solve(weights, shared_grams, [1.0, 1.0], 0.8)
    assert (merged - shared).abs().max() > 1e-3  # the per-expert sets changed the result
    assert [d.dataset for d in report.calibration.datasets] == [str(example.datasets[d].resolve()) for d in own]


def test_every_expert_needs_calibration_data(example, tmp_path):
    spec = _spec(example, "regmean")
    del spec["calibration"]
    spec["models"][0]["calibration"] = {"dataset": str(example.datasets["dots"])}
    with pytest.raises(SpecError, match=r"^models\.1\.calibration: "):
        pivotmerge.merge(spec, tmp_path / "out")


def test_evaluate_inputs_puts_base_and_experts_beside_the_merge_in_report_and_cli(example, tmp_path, capsys):
    from pivotmerge.cli.main import main
    from pivotmerge.data.evaluate import evaluate_model

    spec = _spec(example, "linear", evaluate=[{"dataset": str(example.datasets["dots"]), "limit": 2}], evaluate_inputs=True)
    del spec["calibration"]
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    main(["merge", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])  # returns normally on success
    out = capsys.readouterr().out
    evaluation = json.loads((tmp_path / "out" / "merge_report.json").read_text())["evaluation"]
    experts = [str(e) for e in example.experts]
    assert list(evaluation) == ["merged", "base", *experts]
    data = [load_dataset(example.datasets["dots"], limit=2)]
    for label, folder in [("base", example.base), *zip(experts, example.experts)]:
        (direct,) = evaluate_model(folder, data, device="cpu")
        assert evaluation[label][0]["caption_loss"] == pytest.approx(direct.caption_loss, rel=1e-6)
    # The table on stdout has one row per model, with the merged model's loss as stored.
    assert f"{evaluation['merged'][0]['caption_loss']:.4f}" in out
    assert all(f"{evaluation[label][0]['caption_loss']:.4f}" in out for label in evaluation)


def test_evaluate_inputs_needs_evaluate_datasets(example):
    with pytest.raises(SpecError, match="^evaluate_inputs: needs `evaluate` datasets"):
        pivotmerge.spec_from_dict({**_spec(example, "linear"), "evaluate_inputs": True})


def test_pivotmerge_combine_gram_receives_each_experts_grams(example, tmp_path):
    # Everything else off and scale 1: the merge is RegMean's closed form on the engine's Grams.
    off = {"shared_space": False, "filtering": False, "spectrum": "keep", "layer_weighting": "uniform",
           "lambda_max": 1.0, "combine": "gram", "gram_alpha": 0.8, "gram_inputs": "expert"}
    spec = _spec(example, "pivotmerge", parameters=off)
    for entry, domain in zip(spec["models"], ["shapes", "dots"]):
        entry["calibration"] = {"dataset": str(example.datasets[domain])}
    report = pivotmerge.merge(spec, tmp_path / "out")
    grams = [collect_grams(e, load_dataset(example.datasets[d]), [W1], device="cpu")[W1]
             for e, d in zip(example.experts, ["shapes", "dots"])]
    weights = [load_file(e / "model.safetensors")[W1] for e in example.experts]
    merged = load_file(tmp_path / "out" / "model.safetensors")[W1]
    assert torch.allclose(merged, regmean_solve(weights, grams, [1.0, 1.0], 0.8), atol=1e-5)
    assert W1 in report.calibration.gram_tensors and report.calibration.alignment is None
    entry = next(e for e in report.layers if e.tensor == W1)
    assert entry.info["combine"] == "gram"


def test_pivotmerge_gram_combine_on_one_layer_with_data_weights(example, tmp_path):
    combine = [{"filter": "linear_1", "value": "gram"}, {"value": "sum"}]
    spec = _spec(example, "pivotmerge", parameters={"layer_weighting": "data", "combine": combine, "gram_inputs": "expert"})
    report = pivotmerge.merge(spec, tmp_path / "out")
    layers = {e.tensor: e for e in report.layers}
    assert layers[W1].info["combine"] == "gram" and layers[W1].params["combine"] == "gram"
    assert layers[W1.replace("linear_1", "linear_2")].info["combine"] == "sum"
    assert set(report.calibration.alignment.scores) == {"projector.1", "projector.2"}


DATA_MODE = {"combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs", "off_diagonal_scale": 1.0,
             "spectrum": "keep", "residual_weight": 1.0, "scale_min": 1.0}


def test_calibration_and_no_parameters_get_pivotmerges_data_mode(example, tmp_path):
    free = _spec(example, "pivotmerge")
    del free["calibration"]
    pivotmerge.merge(free, tmp_path / "free")
    report = pivotmerge.merge(_spec(example, "pivotmerge"), tmp_path / "data")
    layers = [e for e in report.layers if e.tensor.endswith(".weight")]
    assert len(layers) == 2
    for entry in layers:  # the report shows what ran: the data defaults, and the alignment they read
        # (the report leaves out values equal to the Params defaults: the data mode's spectrum, keep, is one)
        defaults = get_method("pivotmerge").params.model_fields
        assert {k: entry.params.get(k, defaults[k].default) for k in DATA_MODE} == DATA_MODE
        assert entry.info["combine"] == "gram (merged inputs)" and entry.info["scale"] == 1.0
    assert report.calibration.passes == 2 and report.calibration.gram_tensors
    with_data, without = load_file(tmp_path / "data" / "model.safetensors"), load_file(tmp_path / "free" / "model.safetensors")
    for entry in layers:
        assert (with_data[entry.tensor] - without[entry.tensor]).abs().max() > 1e-3


def test_parameters_the_spec_sets_win_over_the_data_defaults(example, tmp_path):
    report = pivotmerge.merge(_spec(example, "pivotmerge", parameters={"layer_weighting": "data", "gram_alpha": 0.8,
                                                                       "spectrum": "flatten"}), tmp_path / "out")
    entry = next(e for e in report.layers if e.tensor == W1)
    # spectrum: flatten, set by the spec, wins over the data default (keep).
    assert entry.params["layer_weighting"] == "data" and len(entry.params["alignment"]) == 2
    assert entry.params["spectrum"] == "flatten"
    assert entry.params["combine"] == "gram" and entry.params["gram_inputs"] == "merged"
    assert entry.params["off_diagonal_scale"] == 0.8 and "gram_alpha" not in entry.params
    assert report.calibration.alignment is not None and report.calibration.passes == 2
