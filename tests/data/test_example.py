"""The example maker writes real, loadable, deterministic LLaVA repos and data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from pivotmerge.data.example import make_dataset, make_example


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("ex"), n_experts=2, seed=3, lm_experts=True,
                        with_data=True, n_samples=3)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_base_loads_and_generates(example):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(example.base).eval()
    processor = AutoProcessor.from_pretrained(example.base)
    record = json.loads(example.datasets["shapes"].read_text().splitlines()[0])
    image = Image.open(example.datasets["shapes"].parent / record["image"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    # The prompt expands to one <image> token per patch, and every word is in the vocabulary.
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_index) == model.config.image_seq_length
    assert processor.tokenizer.unk_token_id not in ids
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(ids) + 4)


def test_experts_differ_only_in_intended_tensors(example):
    base = load_file(example.base / "model.safetensors")
    intended = set(example.perturbed)
    assert any(n.startswith("model.multi_modal_projector.") for n in intended)
    assert any(".language_model.layers.1.mlp.down_proj." in n for n in intended)
    assert not any("norm" in n or "embed" in n or "vision_tower" in n for n in intended)
    experts = [load_file(e / "model.safetensors") for e in example.experts]
    for expert in experts:
        assert expert.keys() == base.keys()
        changed = {n for n in base if not torch.equal(base[n], expert[n])}
        assert changed == intended
    # Experts share part of their update, and each has its own, so they differ from one another.
    for n in intended:
        d1, d2 = (experts[0][n] - base[n]).flatten(), (experts[1][n] - base[n]).flatten()
        cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
        assert 0.1 < cos < 0.9, (n, cos)


def test_same_seed_same_bytes(tmp_path):
    a = make_example(tmp_path / "a", n_experts=2, seed=7)
    b = make_example(tmp_path / "b", n_experts=2, seed=7)
    c = make_example(tmp_path / "c", n_experts=2, seed=8)
    for x, y, z in zip([a.base, *a.experts], [b.base, *b.experts], [c.base, *c.experts]):
        assert _sha(x / "model.safetensors") == _sha(y / "model.safetensors")
        assert _sha(x / "model.safetensors") != _sha(z / "model.safetensors")


def test_dataset_records_point_at_images(tmp_path):
    path = make_dataset(tmp_path / "d", "dots", n=5, seed=1, image_size=32)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 5
    for r in records:
        assert Image.open(path.parent / r["image"]).size == (32, 32)
        assert r["caption"].endswith("dots") and r["answer"] == r["caption"].split()[0]


def test_cli_writes_a_spec_naming_the_repos(tmp_path):
    from pivotmerge.cli.main import cli

    result = CliRunner().invoke(cli, ["make-example", str(tmp_path / "out"), "--experts", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load((tmp_path / "out" / "pivotmerge.yaml").read_text())
    assert spec["method"] == "pivotmerge" and spec["components"] == ["projector"]
    assert Path(spec["base_model"]) == (tmp_path / "out" / "base").resolve()
    assert [Path(m["model"]).name for m in spec["models"]] == ["expert_1", "expert_2"]
    assert "pivotmerge.yaml" in result.output
