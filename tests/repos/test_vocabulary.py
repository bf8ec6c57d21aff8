"""Experts whose vocabulary extends the base's: rows dropped by default, appended with `tokenizer: union`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pivotmerge import CompatibilityError, merge
from tests.repos.test_family_matrix import _loads_and_generates, _state
from tests.repos.test_text_lm_inputs import _fine_tuned_text_lm
from tests.repos.tiny_families import Built

EMBED, HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
ADDED = ["<calc>", "<tool>"]


def _with_added_tokens(expert: Path, out: Path) -> Path:
    """`expert` with two tokens added to its tokenizer and two new embedding / head rows."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(expert)
    processor = AutoProcessor.from_pretrained(expert)
    processor.tokenizer.add_tokens(ADDED)
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    with torch.no_grad():
        width = model.get_input_embeddings().weight.shape[1]
        model.get_input_embeddings().weight[-2:] = torch.tensor([[1.0], [2.0]]).expand(2, width)
        model.get_output_embeddings().weight[-2:] = -1.0
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def grown(family_models: dict[str, Built], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_added_tokens(family_models["llava"].experts[0], tmp_path_factory.mktemp("vocab") / "grown")


def _spec(built: Built, grown: Path, **extra: object) -> dict:
    return {"method": "task_arithmetic", "base_model": str(built.base), "parameters": {"lambda": 0.5}, "device": "cpu",
            "models": [{"model": str(grown)}, {"model": str(built.experts[1])}], **extra}


def test_by_default_the_added_rows_are_dropped(family_models: dict[str, Built], grown: Path, tmp_path: Path) -> None:
    built = family_models["llava"]
    report = merge(_spec(built, grown), tmp_path / "out").as_json()
    base, first, second, out = _state(built.base), _state(grown), _state(built.experts[1]), _state(tmp_path / "out")
    rows = base[EMBED].shape[0]
    assert first[EMBED].shape[0] == rows + 2 and out[EMBED].shape == base[EMBED].shape
    for name in (EMBED, HEAD):
        torch.testing.assert_close(out[name],
                                   base[name] + 0.5 * ((first[name][:rows] - base[name]) + (second[name] - base[name])))
    assert report["vocabulary"] == {"policy": "base", "base_rows": rows, "rows": rows, "dropped": {str(grown): ADDED},
                                    "appended": []}
    written = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert written == json.loads((built.base / "tokenizer.json").read_text())


def test_union_appends_the_added_tokens_and_their_rows(family_models: dict[str, Built], grown: Path,
                                                       tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    built = family_models["llava"]
    report = merge(_spec(built, grown, tokenizer="union"), tmp_path / "out").as_json()
    base, first, out = _state(built.base), _state(grown), _state(tmp_path / "out")
    rows = base[EMBED].shape[0]
    assert out[EMBED].shape[0] == rows + 2 and out[HEAD].shape[0] == rows + 2
    for name in (EMBED, HEAD):
        assert torch.equal(out[name][rows:], first[name][rows:])  # copied from the expert that has them
    assert report["vocabulary"]["appended"] == [{"token": t, "source": str(grown)} for t in ADDED]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids(ADDED) == [rows, rows + 1]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == rows + 2
    _loads_and_generates("llava", tmp_path / "out")


def test_an_expert_with_fewer_rows_than_the_base_is_refused(family_models: dict[str, Built], grown: Path,
                                                            tmp_path: Path) -> None:
    built = family_models["llava"]
    spec = {"method": "task_arithmetic", "base_model": str(grown), "models": [{"model": str(built.experts[1])}]}
    with pytest.raises(CompatibilityError, match="rows, fewer than"):
        merge(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_text_lm_without_the_vlm_image_token_keeps_the_base_rows_for_it(family_models: dict[str, Built],
                                                                          tmp_path: Path) -> None:
    built = family_models["llava"]
    lm = _fine_tuned_text_lm(built.base, tmp_path / "lm", "llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(lm / "model.safetensors"))
    short = {k: (v[:-1] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in weights.items()}
    save_file(short, str(lm / "model.safetensors"), metadata={"format": "pt"})
    merge({"method": "task_arithmetic", "base_model": str(built.base), "models": [{"model": str(lm)}],
           "parameters": {"lambda": 1.0}, "device": "cpu"}, tmp_path / "out")
    base, out = _state(built.base), _state(tmp_path / "out")
    for lm_name, name in (("model.embed_tokens.weight", EMBED), ("lm_head.weight", HEAD)):
        torch.testing.assert_close(out[name][:-1], short[lm_name])
        assert torch.equal(out[name][-1], base[name][-1])  # the image token's row: the LM has none


def test_the_first_pass_of_a_refit_tokenizes_with_the_union_vocabulary(family_models: dict[str, Built], grown: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """RegMean++ (`gram_inputs: merged`) measures inputs in its first-pass model: that model must read the
    added tokens as the output will, not as the base tokenizer's unknown pieces."""
    from PIL import Image
    from transformers import AutoTokenizer

    import pivotmerge.run.merge as engine

    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"image": "red.png", "caption": "a red <calc> square"}) + "\n")
    first_pass_ids: list[list[int]] = []
    measure = engine.merged_input_calibration

    def measure_and_record(plan, folder, *args, **kwargs):  # the real measurement, after noting the folder's tokenizer
        first_pass_ids.append(AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(ADDED))
        return measure(plan, folder, *args, **kwargs)

    monkeypatch.setattr(engine, "merged_input_calibration", measure_and_record)
    built = family_models["llava"]
    spec = {**_spec(built, grown, tokenizer="union"), "method": "regmean", "parameters": {"gram_inputs": "merged"},
            "components": ["projector", "language_model"], "calibration": {"dataset": str(tmp_path / "calib.jsonl")}}
    merge(spec, tmp_path / "out")
    rows = _state(built.base)[EMBED].shape[0]
    assert first_pass_ids == [[rows, rows + 1]]
    assert AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids(ADDED) == [rows, rows + 1]
