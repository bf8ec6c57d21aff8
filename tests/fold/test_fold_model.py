"""`pivotmerge fold` / `pivotmerge.fold.fold`: folding a model repo's modality-specific FFNs, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pivotmerge.fold import fold
from tests.repo_factory import write_repo
from tests.fold.test_folding import Model, MoMEBlock, SharedBlock, _integer_state

SPEC = """\
model: vlmo
method: modality_arithmetic
lambda: 0.5
groups:
  vision: {pattern: '\\.mlp\\.vision\\.', replace: '.mlp.'}
  text: {pattern: '\\.mlp\\.text\\.', replace: '.mlp.'}
w0_model: pretrained
out_shard_size: 200
"""
EMBED = "embed.weight"  # a tensor outside every group: carried unchanged


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(str(file)))
    return out


@pytest.fixture
def repos(tmp_path):
    state = _integer_state(Model(MoMEBlock), 1) | {EMBED: torch.arange(6.0).reshape(2, 3)}
    w0 = _integer_state(Model(SharedBlock), 2)  # the pre-trained FFN both modality experts started from
    write_repo(tmp_path / "specs" / "vlmo", state, extra_files={"tokenizer_config.json": "{}"})
    write_repo(tmp_path / "specs" / "pretrained", w0)
    (tmp_path / "specs" / "fold.yaml").write_text(SPEC)
    return state, w0


def test_cli_fold_writes_w0_plus_lambda_times_summed_deltas(tmp_path, repos, run_cli):
    state, w0 = repos
    result = run_cli("fold", "specs/fold.yaml", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    folded = _read_all(out)
    assert set(folded) == set(w0) | {EMBED}  # sources gone, folded names and the untouched rest
    for name, base in w0.items():
        v, t = state[name.replace(".mlp.", ".mlp.vision.")], state[name.replace(".mlp.", ".mlp.text.")]
        assert torch.equal(folded[name], base + 0.5 * ((v - base) + (t - base)))
    assert torch.equal(folded[EMBED], state[EMBED])
    # 200-byte shards: several files and an index that names each tensor's file.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and set(index) == set(folded)
    report = json.loads((out / "fold_report.json").read_text())
    assert report["folded"]["layers.0.mlp.up.weight"] == {"vision": "layers.0.mlp.vision.up.weight",
                                                          "text": "layers.0.mlp.text.up.weight"}
    assert report["spec"]["scale"] == 0.5
    assert sorted(f["name"] for f in report["files"]) == sorted(set(index.values()))
    assert (out / "tokenizer_config.json").is_file() and "modality_arithmetic" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left
    assert "folded 8 tensors from 2 modalities" in result.stderr


def test_python_api_interpolates_and_casts(tmp_path, repos):
    state, _ = repos
    spec = {"model": str(tmp_path / "specs" / "vlmo"), "method": "interpolation", "weights": {"vision": 3.0},
            "groups": {"vision": {"pattern": r"\.mlp\.vision\.", "replace": ".mlp."},
                       "text": {"pattern": r"\.mlp\.text\.", "replace": ".mlp."}}, "dtype": "float16"}
    seen = []
    report = fold(spec, tmp_path / "out", progress=seen.append)
    folded = load_file(str(tmp_path / "out" / "model.safetensors"))
    v, t = state["layers.1.mlp.vision.down.weight"], state["layers.1.mlp.text.down.weight"]
    assert folded["layers.1.mlp.down.weight"].dtype == torch.float16
    assert torch.equal(folded["layers.1.mlp.down.weight"], ((3 * v + t) / 4).half())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert len(report["folded"]) == 8 and seen[-1].stage == "done"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("w0_model: pretrained\n", ""),
     "error: model: vlmo has no tensor layers.0.mlp.down.bias (W0 for modality_arithmetic"),
    (lambda s: s.replace("lambda: 0.5", "lambda: lots"), "error: lambda: Input should be a valid number"),
    (lambda s: s.replace("modality_arithmetic", "regmean").replace("w0_model: pretrained\n", ""),
     "error: calibration: regmean folding needs one of calibration (a dataset) or calibration_inputs"),
    (lambda s: s.replace("model: vlmo", "model: nowhere"), "error: nowhere: no such model folder"),
    (lambda s: s.replace("'\\.mlp\\.text\\.'", "'\\.attn\\.'"), "but modality 'text' has no tensor for it"),
    (lambda s: s[:s.index("groups:")] + s[s.index("w0_model"):],
     "error: groups: this model has no folding table; give a name map per modality"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, repos, run_cli, edit, message):
    spec = tmp_path / "specs" / "fold.yaml"
    spec.write_text(edit(spec.read_text()))
    result = run_cli("fold", "specs/fold.yaml", "-o", "out", cwd=tmp_path)
    # The progress bar's last state may precede the error, as for `pivotmerge merge`.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("folding (")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_the_spec(tmp_path, run_cli):
    result = run_cli("fold", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("FOLD_SPEC", "modality_arithmetic", "W0 + lambda", "w0_model", "calibration", "fold_report.json"):
        assert word in result.stdout
