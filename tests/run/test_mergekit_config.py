"""mergekit configs run as PivotMerge specs, or fail naming what cannot be mapped."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.errors import SpecError
from pivotmerge.spec.schema import spec_from_dict
from tests.repo_factory import llava_like, write_repo

TIES_YAML = """
merge_method: ties
base_model: base
models:
  - model: base
  - model: e1
    parameters: {weight: 0.7, density: 0.5}
  - model: e2
    parameters: {weight: 0.3, density: [0.2, 0.8]}
parameters:
  normalize: true
  int8_mask: true
  lambda: 0.9
dtype: bfloat16
"""


def test_ties_config_maps_to_the_same_words():
    spec = spec_from_dict(yaml.safe_load(TIES_YAML))
    assert spec.method == "ties" and spec.base_model == "base"
    assert [m.model for m in spec.models] == ["e1", "e2"]
    assert [m.weight for m in spec.models] == [0.7, 0.3]
    assert spec.models[1].parameters == {"density": [0.2, 0.8]}
    assert spec.parameters == {"normalize": True, "lambda": 0.9}
    assert spec.dtype == "bfloat16"


def test_filters_become_escaped_regexes_and_dare_rescale_maps_to_l1():
    spec = spec_from_dict({
        "merge_method": "dare_linear", "base_model": "b",
        "models": [{"model": "e", "parameters": {"weight": [{"filter": "mlp.up", "value": 2.0}, {"value": 1.0}]}}],
        "parameters": {"rescale": True, "density": 0.5},
    })
    assert spec.models[0].weight[0].filter == r"mlp\.up"
    assert spec.parameters["rescale"] == "l1"


def test_slerp_goes_from_the_base_to_the_other_model():
    spec = spec_from_dict({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                           "parameters": {"t": 0.25}})
    assert [m.model for m in spec.models] == ["a", "b"] and spec.parameters == {"t": 0.25}


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "model_stock", "models": [{"model": "a"}]}, "merge_method: mergekit method 'model_stock' has no pivotmerge equivalent"),
    ({"merge_method": "linear", "slices": []}, "slices: mergekit key not supported by pivotmerge (layer slicing"),
    ({"merge_method": "linear", "models": [{"model": "a+lora"}]}, "models.0.model: LoRA references"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"}, "tokenizer_source: only 'base'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of 'ties'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int4"}, "dtype: 'int4' is not one of"),
])
def test_what_cannot_be_mapped_is_an_error_naming_the_key(config, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(config)
    assert str(err.value).startswith(message)


def test_a_mergekit_config_merges_like_the_native_spec(tmp_path):
    src = llava_like(0)
    write_repo(tmp_path / "base", src)
    write_repo(tmp_path / "e1", {k: v + 1 if v.is_floating_point() else v for k, v in src.items()})
    write_repo(tmp_path / "e2", {k: v - 2 if v.is_floating_point() else v for k, v in src.items()})
    config = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "base"}, {"model": "e1", "parameters": {"weight": 0.5}}, {"model": "e2", "parameters": {"weight": 0.25}}]}
    pivotmerge.merge(spec_from_dict(config), tmp_path / "out", relative_to=tmp_path)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(merged[name], src[name] + 0.5 * 1 + 0.25 * -2)
