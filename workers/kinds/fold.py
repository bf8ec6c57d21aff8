"""Fold jobs (/v1/folds): `pivotmerge fold` as a job. The body's `spec` is a fold spec (the CLI's YAML);
the output folder is the folded, modality-agnostic model, with fold_report.json and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pivotmerge.fold.fold_repo import FoldJobSpec, check_fold, fold

from workers.kinds import JobKind, JobRun, Outcome, declare


class FoldRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: FoldJobSpec = Field(..., description="The fold spec, as `pivotmerge fold` reads it (docs/folding.md).")


def check_fold_spec(spec: FoldJobSpec, *, allowed_roots: Sequence[Path], allow_downloads: bool) -> None:
    # The fold engine reads local folders (and the hub cache) only: there is nothing to download.
    check_fold(spec, allowed_roots=allowed_roots)


def fold_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The fold report's figures: what was folded, how much was written, how long it took."""
    calibration = report.get("calibration", {})
    return {"method": report["method"], "folded_tensors": len(report["folded"]),
            "modalities": len(report["spec"]["groups"]), "output_bytes": sum(f["size"] for f in report["files"]),
            "total_s": report["timings"]["total_s"],
            **({"calibration_samples": calibration["samples"]} if calibration else {})}


def run_fold(run: JobRun) -> Outcome:
    report = fold(run.request.spec, run.out_dir, progress=run.job.progress, should_cancel=run.job.should_cancel,
                  allowed_roots=run.settings.allowed_roots)
    return Outcome(report, fold_metrics(report))  # the report lists the shards' sha256: not hashed again


FOLD = declare(JobKind(name="fold", collection="folds", noun="fold", label="Fold", request=FoldRequest,
                       run=run_fold, check_spec=check_fold_spec, spec_field="spec", merge_spec=False))
