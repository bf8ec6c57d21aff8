"""A text-only causal LM merged into a VLM's language model by the family's declared name mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pivotmerge import RepoError, merge
from tests.repos.test_family_matrix import _loads_and_generates, _state
from tests.repos.tiny_families import Built, perturbed

LAMBDA = 0.5


def _fine_tuned_text_lm(vlm: Path, out: Path, model_type: str, **overrides: object) -> Path:
    """The VLM's language model as a text-only causal LM of `model_type`, every weight perturbed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    source = AutoModelForImageTextToText.from_pretrained(vlm)
    text = source.config.text_config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "pad_token_id", "bos_token_id",
            "eos_token_id")
    config = AutoConfig.for_model(model_type, **{**{k: text[k] for k in keep if k in text}, **overrides},
                                  tie_word_embeddings=False)
    lm = AutoModelForCausalLM.from_config(config)
    weights = {**{k.replace("model.language_model.", "model."): v for k, v in source.state_dict().items()
                  if k.startswith("model.language_model.")}, "lm_head.weight": source.state_dict()["lm_head.weight"]}
    if not overrides:
        lm.load_state_dict(perturbed(weights, seed=7), strict=True)
    lm.save_pretrained(out)
    return out


@pytest.mark.parametrize("vlm_type,lm_type", [("llava", "llama"), ("qwen2_vl", "qwen2")])
def test_a_text_only_lm_joins_the_vlm_language_model(vlm_type: str, lm_type: str, family_models: dict[str, Built],
                                                       tmp_path: Path) -> None:
    built = family_models[vlm_type]
    lm = _fine_tuned_text_lm(built.base, tmp_path / "lm", lm_type)
    spec = {"method": "task_arithmetic", "base_model": str(built.base), "parameters": {"lambda": LAMBDA},
            "device": "cpu",
            "models": [{"model": str(built.experts[0])}, {"model": str(lm)}]}
    report = merge(spec, tmp_path / "out").as_json()
    base, expert, out = _state(built.base), _state(built.experts[0]), _state(tmp_path / "out")
    lm_weights = load_file(str(lm / "model.safetensors"))
    assert report["tensors"]["total"] == len(base) and set(out) == set(base)
    from pivotmerge.repos.architectures import architecture_for

    arch = architecture_for(vlm_type)
    lm_by_vlm_name = {arch.canonical(n): n for n in base}
    from_lm = {lm_by_vlm_name[arch.text_prefix + n.removeprefix("model.") if n.startswith("model.") else n]: n
               for n in lm_weights}
    assert len(from_lm) == len(lm_weights) and all(arch.component(n).value == "language_model" for n in from_lm)
    for name in base:
        llm_delta = lm_weights[from_lm[name]] - base[name] if name in from_lm else 0  # vision and projector: unchanged
        want = base[name] + LAMBDA * ((expert[name] - base[name]) + llm_delta)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6, msg=name)
    _loads_and_generates(vlm_type, tmp_path / "out")


def test_a_text_lm_whose_layers_do_not_match_is_refused_in_one_line(family_models: dict[str, Built],
                                                                    tmp_path: Path) -> None:
    built = family_models["llava"]
    lm = _fine_tuned_text_lm(built.base, tmp_path / "lm", "llama", num_hidden_layers=3)
    spec = {"method": "task_arithmetic", "base_model": str(built.base), "models": [{"model": str(lm)}]}
    with pytest.raises(RepoError) as error:
        merge(spec, tmp_path / "out")
    assert str(error.value) == (f"models.0.model: {lm}: text-only llama model does not line up with {built.base}'s "
                                f"language model: its model.layers.2.input_layernorm.weight has no place there "
                                f"(as model.language_model.layers.2.input_layernorm.weight)")
    assert not (tmp_path / "out").exists()
