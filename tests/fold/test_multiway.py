"""The modality-specific VL transformer and its folding into the shared one, end to end on real folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from pivotmerge.models.multiway import MultiwayVLConfig, MultiwayVLModel, SharedVLConfig, SharedVLModel, seed_state

SIZES = dict(hidden_size=8, num_layers=3, num_heads=2, vl_layers=2, image_size=8, patch_size=4, vocab_size=10,
             max_text_len=4)
T, P = 4, 1 + 4  # text tokens; image class token + patches


def _inputs(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(n, 3, 8, 8, generator=g), "input_ids": torch.randint(0, 10, (n, T), generator=g)}


def _multiway(seed: int = 0) -> MultiwayVLModel:
    torch.manual_seed(seed)
    model = MultiwayVLModel(MultiwayVLConfig(**SIZES))
    with torch.no_grad():  # distinct experts and non-trivial biases/norms, so every formula is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture
def specific(tmp_path):
    model = _multiway()
    model.save_pretrained(tmp_path / "specific")
    return model


def test_saved_as_safetensors_and_loaded_by_the_auto_classes(specific, tmp_path):
    files = sorted(p.name for p in (tmp_path / "specific").iterdir())
    assert files == ["config.json", "model.safetensors"]
    loaded = AutoModel.from_pretrained(tmp_path / "specific")
    assert type(loaded) is MultiwayVLModel and loaded.config.model_type == "pivotmerge_multiway_vl"
    x = _inputs()
    assert torch.equal(loaded(**x).last_hidden_state, specific(**x).last_hidden_state)


def test_experts_copied_from_the_seed_compute_the_shared_model():
    torch.manual_seed(1)
    shared = SharedVLModel(SharedVLConfig(**SIZES)).eval()
    config = MultiwayVLConfig(**SIZES)
    multiway = MultiwayVLModel(config).eval()
    multiway.load_state_dict(seed_state(shared.state_dict(), config), strict=True)
    x = _inputs()
    for kwargs in ({"pixel_values": x["pixel_values"]}, {"input_ids": x["input_ids"]}, x):
        assert torch.allclose(multiway(**kwargs).last_hidden_state, shared(**kwargs).last_hidden_state, atol=1e-6)


def test_each_expert_sees_only_its_own_tokens(specific):
    from pivotmerge.data.calibration import GramCollector, linear_modules
    from pivotmerge.fold.grams import routed_grams

    names = [f"blocks.{b}.mlp.{m}.fc1.weight" for b, m in ((0, "v"), (0, "l"), (2, "v"), (2, "l"), (2, "vl"))]
    x = _inputs(n=3)
    with GramCollector(linear_modules(specific, names)) as collector, torch.no_grad():
        specific(**x)
    # A fused pair: below the top blocks each token goes to its modality; in a top block all go to vl.
    assert collector.rows == {names[0]: 3 * P, names[1]: 3 * T, names[4]: 3 * (T + P)}
    # The v expert's Gram in block 0: its input is norm1's output, image tokens of the image-only and fused passes.
    with torch.no_grad():
        block = specific.blocks[0]
        image_only = specific.embed(x["pixel_values"], None, None)[0]
        fused_image = specific.embed(x["pixel_values"], x["input_ids"], None)[0][:, T:]
        attn_in = torch.cat([image_only, fused_image]).reshape(-1, 8)
        qkv = routed_grams(specific, [{"pixel_values": x["pixel_values"]}, x], ["blocks.0.attn.v.qkv.weight"])
        expected = block.norm1["v"](attn_in).double()
    assert torch.allclose(qkv["blocks.0.attn.v.qkv.weight"], expected.T @ expected, atol=1e-9)


def _fold_spec(tmp_path, method: str, **extra) -> None:
    spec = {"model": "specific", "method": method, **extra}
    (tmp_path / "fold.yaml").write_text(json.dumps(spec))


def test_cli_folds_with_the_table_into_a_loadable_shared_model(specific, tmp_path, run_cli):
    _fold_spec(tmp_path, "interpolation", weights={"v": 1.0, "l": 3.0, "vl": 2.0})
    result = run_cli("fold", "fold.yaml", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folded = load_file(str(tmp_path / "out" / "model.safetensors"))
    state = specific.state_dict()
    # Below the top blocks v and l fold 1:3; in the top blocks v, l, vl fold 1:3:2 (vl only where it exists).
    assert torch.allclose(folded["blocks.0.mlp.fc1.weight"],
                          (state["blocks.0.mlp.v.fc1.weight"] + 3 * state["blocks.0.mlp.l.fc1.weight"]) / 4)
    top_q_bias = [state[f"blocks.2.attn.{m}.q_bias"] for m in ("v", "l", "vl")]
    assert torch.allclose(folded["blocks.2.attn.q_bias"], (top_q_bias[0] + 3 * top_q_bias[1] + 2 * top_q_bias[2]) / 6)
    for shared_name in ("rel_pos", "blocks.1.gamma_1", "patch_embed.weight", "token_type.weight", "norm.weight"):
        assert torch.equal(folded[shared_name], state[shared_name])
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    assert type(loaded) is SharedVLModel
    assert set(loaded.state_dict()) == set(folded)


def test_cli_regmean_solves_with_the_routed_grams(specific, tmp_path, run_cli):
    x = _inputs(n=4, seed=3)
    save_file({"pixel_values": x["pixel_values"]}, str(tmp_path / "images.safetensors"))
    save_file({"input_ids": x["input_ids"]}, str(tmp_path / "texts.safetensors"))
    _fold_spec(tmp_path, "regmean", calibration_inputs=["images.safetensors", "texts.safetensors"], alpha=1.0)
    result = run_cli("fold", "fold.yaml", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folded = load_file(str(tmp_path / "out" / "model.safetensors"))
    state = specific.state_dict()
    with torch.no_grad():  # fc2's inputs, by hand: the FFN hidden activations of each modality's own tokens
        def hidden(m: str, kwargs: dict) -> torch.Tensor:
            rows = []
            specific.blocks[0].mlp[m].fc2.register_forward_pre_hook(lambda mod, a: rows.append(a[0].reshape(-1, 16)))
            specific(**kwargs)
            return torch.cat(rows).double()
        hv, hl = hidden("v", {"pixel_values": x["pixel_values"]}), hidden("l", {"input_ids": x["input_ids"]})
    wv, wl = state["blocks.0.mlp.v.fc2.weight"].double(), state["blocks.0.mlp.l.fc2.weight"].double()
    expected = torch.linalg.solve(hv.T @ hv + hl.T @ hl, hv.T @ hv @ wv.T + hl.T @ hl @ wl.T).T
    assert torch.allclose(folded["blocks.0.mlp.fc2.weight"].double(), expected, atol=1e-4)
    # Biases and norms average.
    norm_biases = state["blocks.0.norm2.v.bias"] + state["blocks.0.norm2.l.bias"]
    assert torch.allclose(folded["blocks.0.norm2.bias"], norm_biases / 2)
    report = json.loads((tmp_path / "out" / "fold_report.json").read_text())
    assert report["calibration"]["samples"] == 8
    assert "blocks.2.attn.vl.qkv.weight" not in report["calibration"]["gram_tensors"]


@pytest.mark.parametrize("extra, message", [
    ({"calibration_inputs": ["missing.safetensors"]}, "error: calibration_inputs: missing.safetensors: no such file"),
    ({"calibration_inputs": ["bad.safetensors"]},
     "error: calibration_inputs: the model's forward pass rejects these inputs"),
    ({"calibration_inputs": ["images.safetensors"], "calibration": {"dataset": "x"}},
     "error: calibration: regmean folding needs one of"),
])
def test_bad_calibration_inputs_exit_2_and_leave_nothing(specific, tmp_path, run_cli, extra, message):
    save_file({"pixel_values": torch.zeros(2, 3, 8, 8)}, str(tmp_path / "images.safetensors"))
    save_file({"not_an_argument": torch.zeros(2, 3)}, str(tmp_path / "bad.safetensors"))
    _fold_spec(tmp_path, "regmean", **extra)
    result = run_cli("fold", "fold.yaml", "-o", "out", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("folding (")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_analyze_a_fold_spec_measures_the_experts(tmp_path, run_cli):
    torch.manual_seed(2)
    shared = SharedVLModel(SharedVLConfig(**SIZES))
    config = MultiwayVLConfig(**SIZES)
    twins = MultiwayVLModel(config)
    twins.load_state_dict(seed_state(shared.state_dict(), config))
    twins.save_pretrained(tmp_path / "specific")
    _fold_spec(tmp_path, "interpolation")
    result = run_cli("analyze", "fold.yaml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["modalities"] == ["v", "l", "vl"] and set(out["layers"]) == {"layer.0", "layer.1", "layer.2"}
    assert out["total"]["l2"] == 0.0 and out["total"]["sign_dissimilarity"] == 0.0


def test_inspect_shows_the_fold_groups(specific, tmp_path, run_cli):
    result = run_cli("inspect", "specific", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    groups = {(g["modality"], g["part"]): g["tensors"] for g in json.loads(result.stdout)["fold_groups"]}
    # attention: q_bias, v_bias, qkv.weight, proj.weight, proj.bias; ffn: 2 weights 2 biases; norms: 2 x 2.
    assert groups[("v", "attention")] == 3 * 5 and groups[("vl", "attention")] == 2 * 5
    assert groups[("l", "ffn")] == 3 * 4 and groups[("vl", "layernorm")] == 2 * 4
    assert groups[("shared", "-")] == 8 + 3 * 2 + 2  # embeddings and tables, gammas, final norm
