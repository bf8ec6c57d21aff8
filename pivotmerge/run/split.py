"""Split merges: one merge cut into parts by output shard, run anywhere, then finalized.

The shard layout is fixed before any tensor is merged (writer.plan_shards), so
each part merges and writes its own shard files independently, in another
process or on another machine sharing the output folder; `finalize` then writes
the index, side files, merge report and model card. The weights and index are
byte-identical to a single `merge` of the same spec.

    parts = partition(shard_count(spec), 4)
    results = [merge_shards(spec, folder, p) for p in parts]   # anywhere, in any order
    report = finalize(spec, folder, results)

Parts write into `folder` as they go (each shard under a hidden name until it is
complete); making the folder visible only when complete is the caller's job. The
service's parts write into scratch folders of their own and store their shards
(workers.split_parts); `finalize(..., shards_in_folder=False)` then writes the rest.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from pivotmerge.plan.device import resolve_device
from pivotmerge.plan.plan import MergePlan, Timings, as_spec, plan_merge
from pivotmerge.report.merge_report import MergedTensor, MergeReport
from pivotmerge.run.engine import finish_output, write_shards, write_side_files
from pivotmerge.errors import PivotMergeError, SpecError
from pivotmerge.progress import CancelFn, ProgressFn
from pivotmerge.spec.schema import MergeSpec
from pivotmerge.repos.writer import WrittenFile, plan_shards, write_index

PartResult = dict[str, Any]  # JSON-serialisable, so it can travel as a task result


def _plan(spec: MergeSpec | Mapping[str, Any], allowed_roots: Sequence[str | Path] | None,
          relative_to: Path | None) -> MergePlan:
    spec = as_spec(spec)
    if spec.gives_calibration or spec.evaluate:
        # Calibration statistics are gathered over the whole model before merging; parts cannot share them yet.
        raise SpecError("calibration/evaluate: split merges take data-free specs; run this merge whole")
    return plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to)


def shard_count(spec: MergeSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
                relative_to: Path | None = None) -> int:
    """How many output shards the merge writes (headers only are read)."""
    with _plan(spec, allowed_roots, relative_to) as plan:
        return len(plan_shards(plan.outputs, plan.spec.out_shard_size))


def partition(n_shards: int, parts: int) -> list[list[int]]:
    """Shard indices cut into at most `parts` contiguous runs of near-equal length."""
    parts = max(1, min(parts, n_shards))
    bounds = [round(i * n_shards / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def merge_shards(spec: MergeSpec | Mapping[str, Any], folder: str | Path, shards: Sequence[int], *,
                 progress: ProgressFn | None = None, should_cancel: CancelFn | None = None,
                 allowed_roots: Sequence[str | Path] | None = None, relative_to: Path | None = None) -> PartResult:
    """Merge and write the output shards numbered `shards` into `folder`; returns the part's result."""
    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _plan(spec, allowed_roots, relative_to) as plan:
        n = len(plan_shards(plan.outputs, plan.spec.out_shard_size))
        if not shards or any(not 0 <= i < n for i in shards):
            raise PivotMergeError(f"shards: expected indices in 0..{n - 1}, got {list(shards)}")
        files, entries, timings = write_shards(plan, folder, resolve_device(plan.spec.device), progress,
                                                should_cancel, only=set(shards))
    return {"shards": sorted(set(shards)), "files": [asdict(f) for f in files],
            "layers": [e.model_dump(mode="json") for e in entries],
            "timings": asdict(timings), "total_s": time.perf_counter() - started}


def finalize(spec: MergeSpec | Mapping[str, Any], folder: str | Path, parts: Sequence[PartResult], *,
             allowed_roots: Sequence[str | Path] | None = None, relative_to: Path | None = None,
             shards_in_folder: bool = True) -> MergeReport:
    """Check the parts cover every shard once; write the index, side files, report and model card.

    With `shards_in_folder=False` the parts put their shards elsewhere (the
    service's artifact store) and `folder` gets only what this step writes.
    The report's total time is the parts' summed time plus this step's.
    """
    started = time.perf_counter() - sum(p["total_s"] for p in parts)
    folder = Path(folder)
    with _plan(spec, allowed_roots, relative_to) as plan:
        shards = plan_shards(plan.outputs, plan.spec.out_shard_size)
        covered = sorted(i for p in parts for i in p["shards"])
        if covered != list(range(len(shards))):
            raise PivotMergeError(f"parts cover shards {covered}, expected each of 0..{len(shards) - 1} once")
        files = sorted((WrittenFile(**f) for p in parts for f in p["files"]), key=lambda f: f.file)
        missing = [f.file for f in files if shards_in_folder and not (folder / f.file).is_file()]
        if missing:
            raise PivotMergeError(f"{folder}: shard {missing[0]} is missing")
        order = {name: i for i, name in enumerate(plan.names)}
        entries = sorted((MergedTensor.model_validate(e) for p in parts for e in p["layers"]),
                         key=lambda e: order[e.tensor])
        timings = Timings(*(sum(p["timings"][k] for p in parts) for k in ("read_s", "merge_s", "write_s")))
        write_index(folder, shards)
        write_side_files(plan, folder)
        return finish_output(plan, folder, resolve_device(plan.spec.device), entries, files, timings, started)
