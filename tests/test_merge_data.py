"""The engine uses calibration data (RegMean, PivotMerge data weights) and evaluates the merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.calibration import collect_grams
from pivotmerge.data import load_dataset
from pivotmerge.errors import SpecError
from pivotmerge.example import make_example
from pivotmerge.methods.regmean import regmean_solve

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
    assert W1 in report["calibration"]["gram_tensors"]
    (metrics,) = report["evaluation"]["merged"]
    assert metrics["dataset"] == "dots" and metrics["samples"] == 4 and metrics["caption_loss"] > 0
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["evaluation"] == report["evaluation"]


def test_pivotmerge_data_weighting_receives_alignment_scores(example, tmp_path):
    report = pivotmerge.merge(_spec(example, "pivotmerge", parameters={"layer_weighting": "data"}), tmp_path / "out")
    scores = report["calibration"]["alignment"]["scores"]
    assert set(scores) == {"projector.1", "projector.2"} and all(len(s) == 2 for s in scores.values())
    entry = next(e for e in report["layers"] if e["tensor"] == W1)
    assert entry["params"]["alignment"] == scores["projector.1"]


def test_data_driven_methods_need_calibration(example, tmp_path):
    spec = _spec(example, "regmean")
    del spec["calibration"]
    with pytest.raises(SpecError, match="calibration"):
        pivotmerge.merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
