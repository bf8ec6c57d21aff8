"""A merged tiny LLaVA is a real model: it loads with transformers and generates."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.data.example import make_example


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("ex"), n_experts=2, seed=1, lm_experts=True)


def test_merged_llava_loads_with_transformers_and_generates(example, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "merged"
    spec = {"method": "task_arithmetic", "base_model": str(example.base), "components": ["projector", "language_model"],
            "models": [{"model": str(e), "weight": 0.5} for e in example.experts]}
    report = pivotmerge.merge(spec, out)
    base = load_file(str(example.base / "model.safetensors"))
    experts = [load_file(str(e / "model.safetensors")) for e in example.experts]
    merged = load_file(str(out / "model.safetensors"))
    assert merged.keys() == base.keys()
    for name in example.perturbed:  # W0 + 0.5 (W1 - W0) + 0.5 (W2 - W0)
        assert torch.allclose(merged[name], 0.5 * (experts[0][name] + experts[1][name]), atol=1e-6)
    assert report.tensors.merged > len(example.perturbed)

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    loaded = dict(model.state_dict())
    projector = next(n for n in example.perturbed if "multi_modal_projector" in n)
    assert torch.equal(loaded[projector], merged[projector])
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
