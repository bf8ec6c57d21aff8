"""LoRA / PEFT adapters as merge inputs, checked against peft's own merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pivotmerge import RepoError, merge
from pivotmerge.cli.main import main
from tests.repos.tiny_families import Built


def _adapter(base: Path, out: Path, seed: int, **lora: object) -> dict[str, torch.Tensor]:
    """Save a random LoRA adapter over `base` to `out`; return peft's merge_and_unload of it (legacy-free names)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def _merged_in_memory(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("model_type,targets", [
    ("llava", ["q_proj", "v_proj", "fc1", "embed_tokens"]),  # language model, vision tower, embeddings
    ("qwen2_vl", ["q_proj", "down_proj", "qkv"]),  # Qwen2-VL's vision blocks' fused qkv
])
def test_an_adapter_input_equals_peft_merge_and_unload(model_type: str, targets: list[str],
                                                       family_models: dict[str, Built],
                                                       tmp_path: Path) -> None:
    base = family_models[model_type].base
    want = _adapter(base, tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=targets,
                    modules_to_save=["multi_modal_projector"] if model_type == "llava" else None)
    spec = {"method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(tmp_path / "adapter")}],
            "parameters": {"lambda": 1.0}, "device": "cpu"}
    report = merge(spec, tmp_path / "out").as_json()
    got = _merged_in_memory(tmp_path / "out")
    assert got.keys() == want.keys()
    changed = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(want[name], _merged_in_memory(base)[name]) if name.endswith("q_proj.weight") else 0
    assert changed >= 2  # the adapter moved the language model's and the vision tower's q_proj
    assert report["tensors"]["merged"] == report["tensors"]["total"]  # all components by default


def test_two_adapters_merge_as_their_deltas(family_models: dict[str, Built], tmp_path: Path) -> None:
    base = family_models["llava"].base
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "fc1"], "use_rslora": True}
    first = _adapter(base, tmp_path / "a1", 1, **lora)
    second = _adapter(base, tmp_path / "a2", 2, **lora)
    spec = {"method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 0.5}, "device": "cpu",
            "models": [{"model": str(tmp_path / "a1")}, {"model": str(tmp_path / "a2")}]}
    merge(spec, tmp_path / "out")
    got, w0 = _merged_in_memory(tmp_path / "out"), _merged_in_memory(base)
    for name in w0:
        torch.testing.assert_close(got[name], w0[name] + 0.5 * ((first[name] - w0[name]) + (second[name] - w0[name])),
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_an_adapter_for_another_model_is_one_line_and_nothing_is_written(family_models: dict[str, Built],
                                                                         tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _adapter(family_models["qwen2_vl"].base, tmp_path / "qwen_adapter", 0, r=2, lora_alpha=2,
             target_modules=["q_proj", "qkv"])
    (tmp_path / "spec.yaml").write_text(
        f"method: task_arithmetic\nbase_model: {family_models['llava'].base}\nmodels:\n  - model: qwen_adapter\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # transformers' own output while building the adapter
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "spec.yaml", "-o", "out"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: models.0.model: qwen_adapter: adapter does not fit base ")
    assert "the base has no tensor" in err and "an adapter for another model?" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_a_base_model_is_refused(family_models: dict[str, Built], tmp_path: Path) -> None:
    _adapter(family_models["llava"].base, tmp_path / "adapter", 0, r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(RepoError,
                       match=r"^models\.0\.model: .*adapter: a LoRA adapter; give the model it adapts as base_model$"):
        merge({"method": "linear",
               "models": [{"model": str(tmp_path / "adapter")}, {"model": str(family_models["llava"].base)}]},
              tmp_path / "out")


def test_calibration_data_with_an_adapter_input_is_refused(family_models: dict[str, Built], tmp_path: Path) -> None:
    from pivotmerge import SpecError

    base = family_models["llava"].base
    _adapter(base, tmp_path / "adapter", 0, r=2, lora_alpha=2, target_modules=["q_proj"])
    spec = {"method": "regmean", "base_model": str(base), "calibration": {"dataset": "unused.jsonl"},
            "models": [{"model": str(tmp_path / "adapter")}, {"model": str(family_models["llava"].experts[0])}]}
    with pytest.raises(SpecError, match=r"^models\.0\.model: .*adapter is a LoRA adapter; calibration data runs each "
                                        r"input as a model, which needs a model folder"):
        merge(spec, tmp_path / "out")
