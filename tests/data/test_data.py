"""Dataset files: the format is read as documented, and bad records fail naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pivotmerge.data.datasets import DatasetError, load_dataset, load_ref
from pivotmerge.spec.schema import DatasetRef


def _write(folder: Path, records: list[dict], images: dict[str, bytes | None] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (images or {"img.png": None}).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            Image.new("RGB", (4, 4), (255, 0, 0)).save(target)
        else:
            target.write_bytes(content)
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_records_resolve_relative_to_the_file_and_limit_applies(tmp_path):
    path = _write(tmp_path / "shapes", [
        {"image": "img.png", "caption": " a red square ", "question": "what colour ?", "answer": "red"},
        {"image": "img.png", "caption": "a red square"},
        {"image": "img.png", "caption": "third"},
    ])
    ds = load_dataset(path, limit=2)
    assert ds.name == "shapes" and len(ds.records) == 2 and ds.has_qa
    assert ds.records[0].image == (tmp_path / "shapes" / "img.png").resolve()
    assert ds.records[0].caption == "a red square" and ds.records[0].answer == "red"
    assert ds.records[1].question is None
    ref = load_ref(DatasetRef(name="cal", dataset="shapes/data.jsonl", limit=1), relative_to=tmp_path)
    assert ref.name == "cal" and len(ref.records) == 1


@pytest.mark.parametrize("record, images, message", [
    ({"image": "nope.png", "caption": "x"}, None, "image nope.png does not exist"),
    ({"image": "bad.png", "caption": "x"}, {"bad.png": b"not a png"}, "image bad.png cannot be read"),
    ({"image": "img.png", "caption": "  "}, None, "'caption' is empty"),
    ({"image": "img.png"}, None, "'caption' is missing"),
    ({"image": "img.png", "caption": "x", "question": "q?"}, None, "'question' and 'answer' come together"),
])
def test_bad_record_names_file_and_line(tmp_path, record, images, message):
    good = {"image": "img.png", "caption": "fine"}
    path = _write(tmp_path / "d", [good, record], {"img.png": None, **(images or {})})
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert str(err.value).startswith(f"{path}:2: {message}")


def test_files_outside_the_allowed_roots_are_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    inside = tmp_path / "root"
    escape = _write(inside / "d", [{"image": "../../secret.png", "caption": "x"}])
    with pytest.raises(DatasetError, match=r"data.jsonl:1: image \.\./\.\./secret.png is outside the allowed roots"):
        load_dataset(escape, allowed_roots=[inside])
    # A symbolic link inside the root pointing out of it is an escape too.
    (inside / "d" / "link.png").symlink_to(tmp_path / "secret.png")
    linked = _write(inside / "e", [{"image": "../d/link.png", "caption": "x"}])
    with pytest.raises(DatasetError, match="outside the allowed roots"):
        load_dataset(linked, allowed_roots=[inside])
    with pytest.raises(DatasetError, match="dataset .* is outside the allowed roots"):
        load_dataset(escape, allowed_roots=[tmp_path / "elsewhere"])
    assert len(load_dataset(escape, allowed_roots=[tmp_path]).records) == 1


def test_empty_or_malformed_files_fail_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="has no records"):
        load_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: not valid JSON"):
        load_dataset(tmp_path / "bad.jsonl")
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_dataset(tmp_path / "missing.jsonl")
