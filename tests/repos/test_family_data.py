"""Evaluation and calibration on every family whose processor transformers can build here;
prompt formats; parquet and `datasets` folder inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pivotmerge import merge
from pivotmerge.data.datasets import load_ref
from pivotmerge.data.evaluate import caption_batches, evaluate_model, load_model
from pivotmerge.repos.architectures import architecture_for, place_tensors
from pivotmerge.spec.schema import DatasetRef
from tests.repos.tiny_families import FAMILIES, Built

CAPTIONS = ["a red square on the left", "a blue circle on the right", "the red circle"]
WITH_PROCESSOR = [name for name, family in FAMILIES.items() if family.processor is not None]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


@pytest.mark.parametrize("model_type", WITH_PROCESSOR)
def test_evaluate_and_regmean_calibrate_every_family(model_type: str, family_models: dict[str, Built], jsonl: Path,
                                                     tmp_path: Path) -> None:
    built = family_models[model_type]
    [metrics] = evaluate_model(built.base, [load_ref(DatasetRef(dataset=str(jsonl)))], device="cpu")
    assert metrics.samples == 3 and metrics.prompt == "plain"
    assert metrics.tokens == sum(len(c.split()) + 1 for c in CAPTIONS)  # each caption's words and its end token
    assert math.isfinite(metrics.caption_loss) and 0 <= metrics.token_accuracy <= 1
    spec = {"method": "regmean", "models": [{"model": str(e)} for e in built.experts],
            "components": ["projector", "language_model"],
            "calibration": {"dataset": str(jsonl)}, "evaluate": [{"dataset": str(jsonl), "name": "captions"}],
            "device": "cpu"}
    report = merge(spec, tmp_path / "out").as_json()
    grams = report["calibration"]["gram_tensors"]
    places = place_tensors(architecture_for(model_type), grams)
    assert any(n.endswith("q_proj.weight") for n in grams)
    # Gemma 3's projector is a bare matrix, not an nn.Linear: RegMean averages it
    assert any(p.component.value == "projector" for p in places.values()) == (model_type != "gemma3")
    assert report["calibration"]["datasets"][0]["prompt"] == "plain"
    assert report["evaluation"]["merged"][0]["tokens"] == metrics.tokens


def test_prompt_formats_decide_what_precedes_the_caption(family_models: dict[str, Built], jsonl: Path) -> None:
    loaded = load_model(family_models["llava"].base, "cpu")
    tok = loaded.processor.tokenizer
    records = load_ref(DatasetRef(dataset=str(jsonl))).records[:1]

    def text(prompt: str) -> str:
        [batch] = caption_batches(loaded.processor, records, 8, prompt)
        ids = batch.inputs["input_ids"][0][batch.inputs["attention_mask"][0].bool()]
        return " ".join(t for t in tok.convert_ids_to_tokens(ids) if t != "<image>")  # image tokens: expanded, 16 here

    assert text("plain") == "a red square on the left </s>"
    assert (text("{image} describe the {instruction}")
            == "describe the describe the image . a red square on the left </s>")
    with pytest.raises(ValueError, match="expected plain, chat, or a template with"):
        DatasetRef(dataset="x", prompt="no image here")


def test_parquet_and_datasets_folders_score_as_the_jsonl_does(family_models: dict[str, Built], jsonl: Path,
                                                               tmp_path: Path) -> None:
    import datasets

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    images = [Image.open(jsonl.parent / r["image"]).convert("RGB") for r in rows]  # no filename: stored as PNG bytes
    table = datasets.Dataset.from_dict({"picture": images, "text": [r["caption"] for r in rows]},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "text": datasets.Value("string")}))
    table.to_parquet(str(tmp_path / "captions.parquet"))
    table.save_to_disk(str(tmp_path / "captions_folder"))
    want = evaluate_model(family_models["llava"].base, [load_ref(DatasetRef(dataset=str(jsonl)))], device="cpu")[0]
    for source in ("captions.parquet", "captions_folder"):
        ref = DatasetRef(dataset=str(tmp_path / source), image_column="picture", caption_column="text")
        data = load_ref(ref)
        assert [r.caption for r in data.records] == CAPTIONS and all(isinstance(r.image, bytes) for r in data.records)
        [got] = evaluate_model(family_models["llava"].base, [data], device="cpu")
        assert (got.tokens, got.caption_loss, got.token_accuracy) == (want.tokens, want.caption_loss,
                                                                      want.token_accuracy)
    with pytest.raises(Exception, match=r"no column 'caption' \(columns: picture, text\); "
                                        r"name it with image_column / caption_column"):
        load_ref(DatasetRef(dataset=str(tmp_path / "captions.parquet"), image_column="picture"))


@pytest.mark.parametrize("model_type", ["idefics3", "mllama"])
def test_pivotmerge_data_mode_measures_alignment_on_other_families(model_type: str, family_models: dict[str, Built],
                                                                   jsonl: Path, tmp_path: Path) -> None:
    built = family_models[model_type]
    spec = {"method": "pivotmerge", "base_model": str(built.base), "models": [{"model": str(e)} for e in built.experts],
            "components": ["projector", "language_model"], "parameters": {"layer_weighting": "data"},
            "calibration": {"dataset": str(jsonl)}, "device": "cpu"}
    report = merge(spec, tmp_path / "out").as_json()
    alignment = report["calibration"]["alignment"]
    assert alignment  # per layer group, one contribution per expert, measured by removing that layer's update
    groups = {entry["tensor"]: entry for entry in report["layers"]}
    assert len(groups) == report["tensors"]["merged"]


def test_the_evaluate_command_takes_prompt_and_columns(family_models: dict[str, Built], jsonl: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import datasets

    from pivotmerge.cli.main import main

    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    images = [Image.open(jsonl.parent / r["image"]).convert("RGB") for r in rows]
    datasets.Dataset.from_dict({"picture": images, "text": [r["caption"] for r in rows]},
                               features=datasets.Features({"picture": datasets.Image(),
                                                           "text": datasets.Value("string")}),
                               ).to_parquet(str(tmp_path / "captions.parquet"))
    base, template = family_models["llava"].base, "USER: {image}\n{instruction} ASSISTANT:"
    main(["evaluate", str(base), "--data", str(tmp_path / "captions.parquet"), "--image-column", "picture",
          "--caption-column", "text", "--prompt", template, "--device", "cpu", "--json"])
    [got] = json.loads(capsys.readouterr().out)[base.name]
    [want] = evaluate_model(base, [load_ref(DatasetRef(dataset=str(jsonl), prompt=template))], device="cpu")
    assert got["prompt"] == template and got["samples"] == 3
    assert (got["tokens"], got["caption_loss"]) == (want.tokens, want.caption_loss)
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(base), "--data", str(jsonl), "--prompt", "no image here"])
    assert exit_.value.code == 2
    assert "expected plain, chat, or a template with {image}" in capsys.readouterr().err
