"""`pivotmerge inspect` shows the family table, components and unclaimed tensors; the report records the family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pivotmerge import SpecError, merge
from tests.repos.tiny_families import Built
from tests.repo_factory import llava_like, write_repo



def test_inspect_groups_a_qwen2_vl_checkpoint_by_component(family_models: dict[str, Built], run_cli,
                                                           tmp_path: Path) -> None:
    result = run_cli("inspect", str(family_models["qwen2_vl"].base), "--json", "--tensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["model_type"] == "qwen2_vl" and shown["family"] == "qwen2_vl" and shown["unclaimed"] == []
    by_component = {c["component"]: c for c in shown["components"]}
    assert set(by_component) == {"projector", "vision_tower", "language_model"}
    projector = sorted(t["name"] for t in shown["tensors"] if t["component"] == "projector")
    # on disk (save_pretrained's legacy layout) the merger is `visual.merger.*`
    assert projector == ["visual.merger.ln_q.bias", "visual.merger.ln_q.weight", "visual.merger.mlp.0.bias",
                         "visual.merger.mlp.0.weight", "visual.merger.mlp.2.bias", "visual.merger.mlp.2.weight"]
    assert by_component["projector"]["layers"] == [0, 2]  # mlp.0 and mlp.2 are the projector's own layers
    assert by_component["language_model"]["layers"] == [0, 1] and by_component["vision_tower"]["layers"] == [0, 1]
    assert sum(c["tensors"] for c in shown["components"]) == len(shown["tensors"])


def test_inspect_lists_tensors_no_rule_claims(tmp_path: Path, run_cli) -> None:
    write_repo(tmp_path / "m", {**llava_like(0), "model.stray_scale": torch.ones(2)})
    result = run_cli("inspect", "m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "family table: llava" in result.stdout
    assert "unclaimed by the table: model.stray_scale" in result.stdout


def test_inspect_of_a_missing_folder_is_one_line(tmp_path: Path, run_cli) -> None:
    result = run_cli("inspect", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nowhere: no such model folder"


def test_the_report_records_the_family(family_models: dict[str, Built], tmp_path: Path) -> None:
    built = family_models["idefics3"]
    report = merge({"method": "linear", "models": [{"model": str(e)} for e in built.experts],
                    "components": ["projector"],
                    "device": "cpu"}, tmp_path / "out").as_json()
    assert report["architecture"] == "idefics3"
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["architecture"] == "idefics3"
    assert report["tensors"]["merged"] == 1  # Idefics3's projector is the one connector.modality_projection.proj


def test_a_component_the_model_lacks_is_refused(tmp_path: Path) -> None:
    text_lm = {"model.embed_tokens.weight": torch.ones(8, 4), "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4),
               "lm_head.weight": torch.ones(8, 4)}
    for name in ("a", "b"):
        write_repo(tmp_path / name, text_lm, model_type="llama")
    spec = {"method": "linear", "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
            "components": ["projector"]}
    with pytest.raises(SpecError, match=r"^components: .*/a \(text_lm family, model_type 'llama'\) has no projector "
                                        r"tensors; it has: language_model$"):
        merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
