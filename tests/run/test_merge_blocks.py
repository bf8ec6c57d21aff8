"""Block-level calibration: methods that fit blocks (Need.BLOCK_FEATURES) get each block's features in order.

The projector is one block (linear_1 -> GELU -> linear_2). Its student inputs are what the merged model
feeds it, its teacher inputs and outputs each expert's own on its own calibration set; the block as a
function of its tensors reproduces an expert's outputs from that expert's tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.data.example import make_example
from pivotmerge.methods import _REGISTRY, get_method

PROJECTOR = "model.multi_modal_projector"
NAMES = [f"{PROJECTOR}.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("ex"), n_experts=2, seed=2, with_data=True, n_samples=4)


def _spec(ex, method, parameters):
    own = ("shapes", "dots")
    return {"method": method, "base_model": str(ex.base), "components": ["projector"], "device": "cpu",
            "parameters": parameters,
            "models": [{"model": str(e), "calibration": {"dataset": str(ex.datasets[d])}} for e, d in zip(ex.experts, own)]}


def _state(folder):
    return load_file(folder / "model.safetensors")


def test_prodistill_without_steps_writes_its_start_and_reports_the_block(example, tmp_path):
    report = pivotmerge.merge(_spec(example, "prodistill", {"steps": 0}), tmp_path / "out")
    base, experts, merged = _state(example.base), [_state(e) for e in example.experts], _state(tmp_path / "out")
    for name in NAMES:  # every coefficient at its initial 0.3: task arithmetic at 0.3
        assert torch.allclose(merged[name], base[name] + 0.3 * sum(e[name] - base[name] for e in experts), atol=1e-6)
    (block,) = report.calibration.blocks
    assert block["block"] == PROJECTOR and sorted(block["tensors"]) == sorted(NAMES)
    assert report.timings.total_s > 0


def test_the_method_sees_dual_inputs_and_the_block_as_a_function(example, tmp_path, monkeypatch):
    seen = []
    method = get_method("prodistill")

    def recording(experts, base, start, weights, params, block):
        seen.append((experts, base, start, block))
        return method.fit_block(experts, base, start, weights, params, block)

    monkeypatch.setitem(_REGISTRY, "prodistill", dataclasses.replace(method, fit_block=recording))
    pivotmerge.merge(_spec(example, "prodistill", {"steps": 3}), tmp_path / "out")
    ((experts, base, start, block),) = seen
    assert block.path == PROJECTOR and sorted(block.names) == sorted(NAMES)
    for k, expert in enumerate(experts):
        own = [torch.cat(x) for x in (block.teacher_inputs[k], block.teacher_outputs[k], block.student_inputs[k])]
        # Only the projector is merged: the merged model feeds it the same vision features as the expert.
        assert torch.allclose(own[2], own[0])
        # Its teacher outputs are the expert's projector on them; the block function with its tensors agrees.
        assert torch.allclose(torch.cat([block.forward(expert, k, b, x) for b, x in enumerate(block.teacher_inputs[k])]),
                              own[1], atol=1e-5)
    # The fit starts at the method's per-tensor merge, and moves from it.
    merged = _state(tmp_path / "out")
    assert any(not torch.allclose(merged[n], start[n]) for n in NAMES)


def test_blocks_are_fitted_in_the_models_order(example, tmp_path):
    spec = _spec(example, "prodistill", {"steps": 1})
    spec["components"] = ["projector", "language_model"]
    report = pivotmerge.merge(spec, tmp_path / "out")
    paths = [b["block"] for b in report.calibration.blocks]
    assert paths.index(PROJECTOR) < paths.index("model.language_model.layers.0") < paths.index("model.language_model.layers.1")


def test_pivotmerge_data_mode_fit_starts_at_the_closed_form(example, tmp_path):
    closed = pivotmerge.merge(_spec(example, "pivotmerge", {"distill_steps": 0}), tmp_path / "closed")
    assert closed.calibration.blocks is None and closed.calibration.passes == 2
    refined = pivotmerge.merge(_spec(example, "pivotmerge", {"distill_steps": 5}), tmp_path / "refined")
    (block,) = refined.calibration.blocks
    assert block["block"] == PROJECTOR and block["loss_start"] > 0
    a, b = _state(tmp_path / "closed"), _state(tmp_path / "refined")
    assert any(not torch.allclose(a[n], b[n]) for n in NAMES)
    # The fit's loss at its start is the closed form's: RegMean++'s point.
    entry = next(e for e in refined.layers if e.tensor == NAMES[0])
    assert entry.info["combine"] == "gram (merged inputs)" and entry.info["block"] == PROJECTOR
