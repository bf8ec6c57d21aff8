"""Image-text datasets for evaluation and calibration.

A dataset is a JSONL file, one record a line, beside its images:

    {"image": "images/0001.png", "caption": "a red circle on the left",
     "question": "what colour is the shape ?", "answer": "red"}

`image` is a path relative to the JSONL file; `caption` is required and not
empty; `question` and `answer` are optional but come together. Every record is
checked when the dataset is loaded, so a bad file fails before any model runs,
with the file and line in the message.

A parquet file, or a Hugging Face `datasets` folder written by `save_to_disk`,
works too: its image column (``image`` unless the reference names another)
holds image bytes (the `datasets` Image feature) or paths relative to the file,
its caption column (``caption``) the text; ``question``/``answer`` columns are
read when present.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from pivotmerge.errors import PivotMergeError
from pivotmerge.spec.schema import DatasetRef, MergeSpec


# What a captioning model is asked before the caption it is scored on.
CAPTION_PROMPT = "describe the image ."


class DatasetError(PivotMergeError):
    """A dataset file or one of its records is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    image: Path | bytes  # a resolved path or encoded image bytes, checked readable
    caption: str
    question: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path
    records: list[Record]
    prompt: str = "plain"  # what precedes each caption (DatasetRef.prompt)

    @property
    def has_qa(self) -> bool:
        return any(r.answer is not None for r in self.records)


def load_image(image: Path | bytes) -> Image.Image:
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
        return img.convert("RGB")


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _text(record: dict, key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    return _required_text(value, key, where)


def _required_text(value: object, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: '{key}' must be a string" if value is not None
                           else f"{where}: '{key}' is missing")
    if not value.strip():
        raise DatasetError(f"{where}: '{key}' is empty")
    return value.strip()


def _check_image(rel: object, folder: Path, roots: Sequence[Path] | None, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{where}: 'image' must be a path relative to the dataset file")
    path = (folder / rel).resolve()
    if roots is not None and not _inside(path, roots):
        raise DatasetError(f"{where}: image {rel} is outside the allowed roots")
    if not path.is_file():
        raise DatasetError(f"{where}: image {rel} does not exist")
    try:
        with Image.open(path) as img:
            img.verify()  # reads the whole file without decoding pixels into memory
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: image {rel} cannot be read: {exc}") from None
    return path


def _check_image_bytes(data: bytes, where: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: image cannot be read: {exc}") from None
    return data


def _table_rows(path: Path, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file or a `datasets` folder (the first two of `columns` required), images left encoded."""
    try:
        if path.is_dir():
            import datasets

            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise DatasetError(f"dataset {path}: a DatasetDict ({', '.join(table)}); point at one split's folder")
            names = table.column_names
            if columns[0] in names and isinstance(table.features[columns[0]], datasets.Image):
                table = table.cast_column(columns[0], datasets.Image(decode=False))
            rows: Any = table.select_columns([c for c in columns if c in names])
        else:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            rows = pq.read_table(path, columns=[c for c in columns if c in names]).to_pylist()
    except ImportError:
        raise DatasetError(f"dataset {path}: reading parquet or datasets folders needs the `datasets` package "
                           f"(pip install 'pivotmerge[data]')") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in columns[:2] if c not in names]
    if missing:
        raise DatasetError(f"dataset {path}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                           f"name it with image_column / caption_column")
    yield from rows


def parse_table_row(row: dict[str, Any], image_column: str, caption_column: str, folder: Path,
                    roots: Sequence[Path] | None, where: str) -> Record:
    caption = _required_text(row.get(caption_column), caption_column, where)
    question = _text(row, "question", where, required=False)
    answer = _text(row, "answer", where, required=False)
    if (question is None) != (answer is None):
        raise DatasetError(f"{where}: 'question' and 'answer' come together")
    value = row.get(image_column)
    if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Record(_check_image_bytes(value, where), caption, question, answer)
    return Record(_check_image(value, folder, roots, where), caption, question, answer)


def parse_record(line: str, folder: Path, roots: Sequence[Path] | None, where: str) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    caption = _required_text(data.get("caption"), "caption", where)
    question = _text(data, "question", where, required=False)
    answer = _text(data, "answer", where, required=False)
    if (question is None) != (answer is None):
        raise DatasetError(f"{where}: 'question' and 'answer' come together")
    image = _check_image(data.get("image"), folder, roots, where)
    return Record(image=image, caption=caption, question=question, answer=answer)


def load_dataset(path: str | Path, *, allowed_roots: Sequence[Path] | None = None,
                 limit: int | None = None, name: str | None = None, prompt: str = "plain",
                 image_column: str = "image", caption_column: str = "caption") -> Dataset:
    """Read and check a JSONL dataset (its first `limit` records).

    With `allowed_roots`, the file and every image must resolve inside one of
    them (symbolic links followed), so a dataset cannot point the service at
    arbitrary files.
    """
    roots = None if allowed_roots is None else [Path(r).expanduser().resolve() for r in allowed_roots]
    path = _expand_home(path)
    resolved = path.resolve()
    if roots is not None and not _inside(resolved, roots):
        raise DatasetError(f"dataset {path} is outside the allowed roots")
    records = []
    if resolved.is_dir() or resolved.suffix == ".parquet":
        folder = resolved if resolved.is_dir() else resolved.parent
        for number, row in enumerate(_table_rows(resolved, [image_column, caption_column, "question", "answer"])):
            records.append(parse_table_row(row, image_column, caption_column, folder, roots, f"{path} row {number}"))
            if limit is not None and len(records) >= limit:
                break
    else:
        try:
            lines = resolved.read_text().splitlines()
        except OSError as exc:
            raise DatasetError(f"cannot read dataset {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            records.append(parse_record(line, resolved.parent, roots, f"{path}:{number}"))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DatasetError(f"dataset {path} has no records")
    return Dataset(name=name or _default_name(path), path=resolved, records=records, prompt=prompt)


def _default_name(path: Path) -> str:
    """`shapes/data.jsonl` is called `shapes`; `shapes.jsonl` too."""
    return path.parent.name if path.stem == "data" else path.stem


def load_ref(ref: DatasetRef, *, allowed_roots: Sequence[Path] | None = None,
             relative_to: Path | None = None) -> Dataset:
    """A spec's `DatasetRef` (`calibration` or an `evaluate` entry), loaded and checked.

    Relative paths are taken from `relative_to` (the spec's folder) when given.
    """
    path = _expand_home(ref.dataset)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    return load_dataset(path, allowed_roots=allowed_roots, limit=ref.limit, name=ref.name, prompt=ref.prompt,
                        image_column=ref.image_column, caption_column=ref.caption_column)


def _expand_home(path: str | Path) -> Path:
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "~name" where no user `name` exists: the home lookup fails
        raise DatasetError(f"dataset {path} does not exist (no such user's home folder)") from None


def spec_datasets(spec: MergeSpec) -> list[tuple[str, DatasetRef]]:
    """Every dataset a spec names, with the field that names it."""
    refs = [("calibration", spec.calibration)] + [(f"evaluate.{i}", r) for i, r in enumerate(spec.evaluate)]
    refs += [(f"models.{i}.calibration", m.calibration) for i, m in enumerate(spec.models)]
    return [(field, ref) for field, ref in refs if ref is not None]


def check_datasets(spec: MergeSpec, *, allowed_roots: Sequence[Path] | None = None,
                   relative_to: Path | None = None) -> None:
    """Load every dataset of the spec, records and images, as a merge would; errors name the field.

    The service calls this before accepting a job, so a dataset outside the
    allowed roots (through `../`, a symbolic link, or an image path in a record)
    is refused at submit, not by the worker.
    """
    for field, ref in spec_datasets(spec):
        try:
            load_ref(ref, allowed_roots=allowed_roots, relative_to=relative_to)
        except DatasetError as exc:
            raise DatasetError(f"{field}.dataset: {exc}") from None
