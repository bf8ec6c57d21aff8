"""`analyze`: distance metrics between models, per layer and in total."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pivotmerge.analysis.analyze import analyze
from pivotmerge.errors import SpecError
from tests.repo_factory import llava_like, write_repo


@pytest.fixture
def opposite_experts(tmp_path):
    """Two experts whose projector updates are +d and -d around the base."""
    src = llava_like(0)
    d = {k: torch.full_like(v, 0.5) if "projector" in k else torch.zeros_like(v) for k, v in src.items() if v.is_floating_point()}
    write_repo(tmp_path / "base", src)
    write_repo(tmp_path / "up", {**src, **{k: src[k] + d[k] for k in d}})
    write_repo(tmp_path / "down", {**src, **{k: src[k] - d[k] for k in d}})
    return {"method": "linear", "base_model": "base", "models": [{"model": "up"}, {"model": "down"}],
            "components": ["projector"]}


def test_opposite_updates_are_maximally_distant(opposite_experts, tmp_path):
    result = analyze(opposite_experts, relative_to=tmp_path)
    assert result["compared"] == "task vectors (W - base)" and result["tensors"] == 4
    assert set(result["layers"]) == {"projector.1", "projector.2"}
    # hidden 4: linear_1 weight (16 entries) + bias (4); each entry differs by 2 * 0.5 = 1
    layer = result["layers"]["projector.1"]
    assert layer["cosine"] == pytest.approx(-1.0)
    assert layer["sign_dissimilarity"] == pytest.approx(1.0)
    expected_l2 = (16 * math.sqrt(16) + 4 * math.sqrt(4)) / 20  # numel-weighted mean of per-tensor L2
    assert layer["l2"] == pytest.approx(expected_l2)
    assert result["total"]["cosine"] == pytest.approx(-1.0)


def test_analysis_needs_two_models(opposite_experts, tmp_path):
    opposite_experts["models"] = opposite_experts["models"][:1]
    with pytest.raises(SpecError, match="^models: analysis compares models"):
        analyze(opposite_experts, relative_to=tmp_path)


def test_cli_prints_json(opposite_experts, tmp_path, capsys):
    from pivotmerge.cli.main import main

    (tmp_path / "spec.json").write_text(json.dumps(opposite_experts))  # JSON is YAML too
    main(["analyze", str(tmp_path / "spec.json"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["total"]["sign_dissimilarity"] == pytest.approx(1.0)
