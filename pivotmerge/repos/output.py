"""Output folders shared by merging and folding: built hidden, moved into place when complete.

A reader never sees a half-written model: everything is written into a hidden
sibling folder (``.OUT.partial-xxxxxxxx``) that is renamed to OUT only once the
weights, side files and report are all there; on any error or cancellation it
is removed.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pivotmerge.errors import PivotMergeError
from pivotmerge.repos.model_repo import PICKLED_SUFFIXES
from pivotmerge.repos.writer import INDEX_FILE

REPORT_FILE = "merge_report.json"
FOLD_REPORT_FILE = "fold_report.json"
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# The source's own index and reports describe the source, not the new output.
NOT_CARRIED = {INDEX_FILE, REPORT_FILE, FOLD_REPORT_FILE}


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless asked to replace it; call before any costly work."""
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise PivotMergeError(f"output folder {out_dir} exists and is not empty (use overwrite / --force)")


@contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """A hidden partial folder beside `out_dir`, renamed to it when the block completes, removed on error."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        yield partial
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def carry_side_files(source: Path, folder: Path, dtype: str | None) -> None:
    """Config, tokenizer and processor files from `source` (never pickles); config dtype set to `dtype` if given."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and path.suffix in CARRIED_SUFFIXES and path.name not in NOT_CARRIED
                and path.suffix not in PICKLED_SUFFIXES):
            shutil.copyfile(path, folder / path.name)
    config = folder / "config.json"
    if dtype and config.is_file():
        data = json.loads(config.read_text())
        data["torch_dtype"] = data["dtype"] = dtype
        config.write_text(json.dumps(data, indent=2) + "\n")
