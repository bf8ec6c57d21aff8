"""Every supported VLM family, on tiny random models built from its transformers config:
each component merged alone and all together, every tensor merged or copied, the output
loading with AutoModelForImageTextToText and generating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pivotmerge import merge
from pivotmerge.repos.architectures import GENERIC, architecture_for, place_tensors
from pivotmerge.spec.schema import Component
from tests.repos.tiny_families import FAMILIES, Built

LAMBDA = 0.7


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_table_claims_every_tensor_in_both_naming_styles(model_type: str,
                                                                family_models: dict[str, Built]) -> None:
    from transformers import AutoModelForImageTextToText

    arch = architecture_for(model_type)
    assert arch is not GENERIC
    on_disk = list(_state(family_models[model_type].base))  # as save_pretrained writes them
    in_memory = list(AutoModelForImageTextToText.from_pretrained(family_models[model_type].base).state_dict())
    disk_places = place_tensors(arch, on_disk)
    memory_places = place_tensors(arch, in_memory)
    assert [n for n, p in disk_places.items() if p.component is None] == []
    assert ({Component.projector, Component.vision_tower, Component.language_model}
            <= {p.component for p in disk_places.values()})
    # the same tensor in either style is in the same place
    by_canonical = {arch.canonical(n): p for n, p in memory_places.items()}
    for name, place in disk_places.items():
        assert by_canonical[arch.canonical(name)] == place, name


@pytest.mark.parametrize("component", ["projector", "vision_tower", "language_model", None])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_merge(model_type: str, component: str | None, family_models: dict[str, Built], tmp_path: Path) -> None:
    built = family_models[model_type]
    spec = {"method": "task_arithmetic", "base_model": str(built.base),
            "models": [{"model": str(e)} for e in built.experts],
            "parameters": {"lambda": LAMBDA}, "device": "cpu", **({"components": [component]} if component else {})}
    report = merge(spec, tmp_path / "out").as_json()
    base, experts = _state(built.base), [_state(e) for e in built.experts]
    out = _state(tmp_path / "out")
    assert report["architecture"] == architecture_for(model_type).name
    assert set(out) == set(base)  # nothing dropped, nothing invented
    places = place_tensors(architecture_for(model_type), base)
    merged = {n for n, p in places.items()
              if base[n].is_floating_point() and (component is None or p.component.value == component)}
    assert report["tensors"] == {"total": len(base), "merged": len(merged), "copied": len(base) - len(merged)}
    for name, tensor in out.items():
        if name in merged:
            want = base[name] + LAMBDA * sum(e[name] - base[name] for e in experts)
            torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(tensor, base[name]), name  # every expert moved every tensor
        else:
            assert torch.equal(tensor, base[name]), name  # copied from the base, unchanged
    if component is None:
        _loads_and_generates(model_type, tmp_path / "out")


def _loads_and_generates(model_type: str, folder: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    family = FAMILIES[model_type]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    if family.processor is not None:
        inputs = dict(AutoProcessor.from_pretrained(folder)(images=image, text=family.prompt, return_tensors="pt"))
    else:  # see Family.why_no_processor
        inputs = dict(AutoTokenizer.from_pretrained(folder)(family.prompt, return_tensors="pt"))
        if model_type != "llava_onevision":
            pixels = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")
            inputs.update({k: v for k, v in pixels.items() if k != "num_patches"})
    prompt_length = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] - prompt_length >= 2


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "mllama"])
def test_an_expert_in_the_current_naming_style_lines_up_with_a_legacy_base(model_type: str,
                                                                           family_models: dict[str, Built],
                                                                           tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    built = family_models[model_type]
    current = tmp_path / "expert_1_current"
    current.mkdir()
    (current / "config.json").write_bytes((built.experts[0] / "config.json").read_bytes())
    state = AutoModelForImageTextToText.from_pretrained(built.experts[0]).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(current / "model.safetensors"))
    assert len(set(state) & set(_state(built.base))) <= 1  # the styles differ on disk (but for an lm_head.weight)
    spec = {"method": "task_arithmetic", "base_model": str(built.base), "parameters": {"lambda": LAMBDA},
            "device": "cpu"}
    merge({**spec, "models": [{"model": str(current)}, {"model": str(built.experts[1])}]}, tmp_path / "mixed")
    merge({**spec, "models": [{"model": str(e)} for e in built.experts]}, tmp_path / "legacy")
    mixed, legacy = _state(tmp_path / "mixed"), _state(tmp_path / "legacy")
    assert mixed.keys() == legacy.keys()
    for name in legacy:
        assert torch.equal(mixed[name], legacy[name]), name
