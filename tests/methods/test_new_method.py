"""Adding a method is one module: registered by the decorator (from the built-in list, an entry point, or any
import), it is validated, listed and merged."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Literal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pivotmerge
from pivotmerge import methods
from pivotmerge.cli.commands import methods_command
from pivotmerge.data.example import make_example
from pivotmerge.errors import SpecError
from pivotmerge.methods import Method, MethodParams, Need
from pivotmerge.spec.schema import spec_from_dict

MODULE = '''
"""Gained mean: W0 + scale * mean_k gain_k (W_k - W0), each model with its own gain."""
from typing import Annotated, Sequence, Union

import torch
from pydantic import Field

from pivotmerge.methods import PER_MODEL, MethodParams, Search, method, per_model
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas
from pivotmerge.methods.fields import Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("lambda")
    gain: Annotated[Union[float, list[float]], PER_MODEL, Search(0.0, 1.0)] = Field(
        1.0, description="Each delta's gain.")


@method("gained_mean", summary="W0 + scale * mean_k gain_k (W_k - W0).", params=Params, execution="elementwise")
def gained_mean(tensors, base, weights, params, generator=None):
    gains = per_model(params.gain, len(tensors), "gain")
    return add_weighted_deltas(base, (t - base for t in tensors), [g / len(tensors) for g in gains], params.scale)
'''
W1 = "model.multi_modal_projector.linear_1.weight"


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The method module written to tmp_path and imported; the registry restored afterwards."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods.all_methods()))
    (tmp_path / "gained_mean_method.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("gained_mean_method")
    yield methods.get_method("gained_mean")
    monkeypatch.delitem(__import__("sys").modules, "gained_mean_method")


def test_a_method_from_one_new_module_is_described_validated_and_merged(registered, tmp_path):
    assert registered.per_model == ("gain",) and set(registered.search_space) == {"scale", "gain"}
    listed = next(m for m in json.loads(CliRunner().invoke(methods_command, ["--json"]).output)["methods"]
                  if m["name"] == "gained_mean")
    parameters = {p["name"]: p for p in listed["parameters"]}
    assert [name for name, p in parameters.items() if p["per_model"]] == ["gain"]
    assert {old: new for old, new in registered.aliases().items() if old != new} == {"lambda": "scale"}
    assert parameters["scale"]["search"] == {"low": 0.05, "high": 2.0, "log": True, "choices": None}
    ex = make_example(tmp_path / "ex", n_experts=2, seed=4)
    spec = {"method": "gained_mean", "base_model": str(ex.base), "components": ["projector"], "device": "cpu",
            "models": [{"model": str(ex.experts[0]), "parameters": {"gain": 0.25}}, {"model": str(ex.experts[1])}],
            "parameters": {"lambda": 0.5}}  # the old spelling of `scale`, accepted by the shared field
    pivotmerge.merge(spec, tmp_path / "out")

    base = load_file(ex.base / "model.safetensors")
    e1, e2 = (load_file(e / "model.safetensors") for e in ex.experts)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    expected = base[W1] + 0.5 * (0.25 * (e1[W1] - base[W1]) + (e2[W1] - base[W1])) / 2
    assert torch.allclose(merged[W1], expected, atol=1e-6)
    assert torch.equal(merged["model.language_model.embed_tokens.weight"],
                       base["model.language_model.embed_tokens.weight"])
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert {e["tensor"]: e for e in report["layers"]}[W1]["params"] == {"scale": 0.5, "gain": [0.25, 1.0]}

    with pytest.raises(SpecError, match=r"^models\.0\.parameters\.scale: not a per-model parameter of 'gained_mean'"):
        spec_from_dict({**spec, "models": [{"model": "a", "parameters": {"scale": 1.0}}, {"model": "b"}]})


class DataParams(MethodParams):
    weighting: Literal["uniform", "data"] = "uniform"
    grams: bool = False
    scale: float = 1.0


def data_needs(params: DataParams) -> set[Need]:
    return ({Need.ALIGNMENT} if params.weighting == "data" else set()) | ({Need.GRAMS} if params.grams else set())


def test_the_calibration_data_a_method_may_read_is_every_setting_of_its_needs():
    reads = Method("reads", "", DataParams, lambda *args: args[0][0], needs=data_needs)
    assert data_needs(DataParams()) == set()  # the defaults read nothing: the other settings are tried too
    assert reads.data == (Need.ALIGNMENT, Need.GRAMS) and reads.engine_params == ("alignment", "grams")
    assert Method("plain", "", DataParams, lambda *args: args[0][0]).data == ()


def test_a_method_module_named_by_an_entry_point_is_registered(tmp_path, monkeypatch):
    """A third-party package names its module in the `pivotmerge.methods` group; no edit of this package."""
    (tmp_path / "gained_mean_plugin.py").write_text(MODULE)
    dist = tmp_path / "gained_mean_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gained-mean-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{methods.ENTRY_POINT_GROUP}]\ngained_mean = gained_mean_plugin\n")
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods.all_methods()))
    monkeypatch.syspath_prepend(str(tmp_path))
    methods._load_builtin.cache_clear()
    try:
        assert methods.get_method("gained_mean").execution == "elementwise"
    finally:
        sys.modules.pop("gained_mean_plugin", None)
