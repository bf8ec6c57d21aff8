"""The engine's speed paths give the same tensors as the plain method call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
import pivotmerge.run.engine as engine
from pivotmerge.methods import get_method
from pivotmerge.plan.params import resolve_params
from pivotmerge.spec.schema import spec_from_dict
from tests.repo_factory import llava_like, write_repo


@pytest.mark.parametrize("method, parameters", [("linear", {}), ("task_arithmetic", {"lambda": 0.6})])
def test_elementwise_methods_merged_in_pieces_equal_the_whole_tensor_call(tmp_path: Path, monkeypatch, method, parameters):
    monkeypatch.setattr(engine, "CPU_PIECE", 7)  # odd-sized pieces, a ragged last piece
    states = [llava_like(seed, hidden=12) for seed in range(3)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    spec = {"method": method, "base_model": str(repos[0]), "models": [{"model": str(r), "weight": 0.5 + i} for i, r in enumerate(repos[1:])],
            "parameters": parameters, "device": "cpu"}
    pivotmerge.merge(spec, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    m = get_method(method)
    for name, base in states[0].items():
        if not base.is_floating_point():
            continue
        resolved = resolve_params(spec_from_dict(spec), m, name, 0.0)
        expected = m([s[name] for s in states[1:]], base, resolved.weights, resolved.params).tensor
        assert torch.allclose(merged[name], expected, rtol=0, atol=1e-6), name


def test_prefetching_reader_survives_a_cancel_midway(tmp_path: Path):
    states = [llava_like(seed) for seed in range(2)]
    repos = [write_repo(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    calls = []

    def cancel_on_third() -> bool:
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(pivotmerge.MergeCancelled):
        pivotmerge.merge({"method": "linear", "models": [{"model": str(r)} for r in repos]}, tmp_path / "out",
                         should_cancel=cancel_on_third)
    assert not any(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()
