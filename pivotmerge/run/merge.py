"""The merge: a spec run through its stages into a finished output folder.

Stages: plan (checked once, then left as is), calibration (what the method needs, measured and
returned), the passes that stream tensors through the method (`pivotmerge.run.streaming`),
evaluation, and the report, written once.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pivotmerge.data.blocks import fit_blocks, refit_blocks
from pivotmerge.data.calibration import Calibrated, calibrate, merged_input_calibration
from pivotmerge.data.evaluate import Evaluation, evaluate_merge, evaluation_data
from pivotmerge.methods import Calibration, Merged, Need
from pivotmerge.plan.device import resolve_device
from pivotmerge.plan.plan import MergePlan, Timings, plan_merge
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.report.merge_report import (CalibrationReport, MergedTensor, MergeReport, build_report,
                                            write_model_card, write_report)
from pivotmerge.repos.model_repo import resolve_roots
from pivotmerge.repos.output import building, carry_side_files, check_out_dir
from pivotmerge.repos.vocab import write_tokenizer
from pivotmerge.repos.writer import WrittenFile
from pivotmerge.run.streaming import merge_tensor, read_inputs, write_shards
from pivotmerge.spec.schema import MergeSpec


def merge(spec: MergeSpec | Mapping[str, Any], out_dir: str | Path, *, progress: ProgressFn | None = None,
          should_cancel: CancelFn | None = None, allowed_roots: Sequence[str | Path] | None = None,
          relative_to: Path | None = None, overwrite: bool = False, allow_downloads: bool = False) -> MergeReport:
    """Run a merge into `out_dir` and return its report (also written as merge_report.json).

    Stages: plan (checked once, then left as is), calibration (`_calibration_stage`: what the
    method needs, measured and returned), streaming (`write_shards`), evaluation, report (written once).
    The output is built in a hidden sibling folder and moved into place only when complete; on error or
    cancellation (MergeCancelled) nothing is left behind.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    with plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to,
                    allow_downloads=allow_downloads) as plan:
        device = resolve_device(plan.spec.device)
        roots = resolve_roots(allowed_roots)
        eval_data = evaluation_data(plan.spec.evaluate, allowed_roots=roots, relative_to=relative_to)
        calibrated = calibrate(plan, device, allowed_roots=roots, relative_to=relative_to, progress=progress)
        with building(out_dir) as partial:
            calibrated = _calibration_stage(plan, out_dir, device, calibrated, progress, should_cancel)
            merge_progress = progress
            if Need.MERGED_INPUTS in plan.needs:
                merge_progress = _with_message(progress, "second pass: each layer fitted on the merged model's inputs")
            files, entries, timings = write_shards(plan, partial, device, merge_progress, should_cancel,
                                                   calibrated=calibrated)
            write_side_files(plan, partial)
            evaluation = (evaluate_merge(_evaluated_models(plan, partial), eval_data, device, progress=progress,
                                         should_cancel=should_cancel) if eval_data else None)
            report = finish_output(plan, partial, device, entries, files, timings, started,
                                   calibration=calibrated.report, evaluation=evaluation)
    if progress is not None:
        progress(Progress("done", 1, 1))
    return report


def _calibration_stage(plan: MergePlan, out_dir: Path, device: torch.device, calibrated: Calibrated,
                       progress: ProgressFn | None, should_cancel: CancelFn | None) -> Calibrated:
    """What the merge's tensors need beyond the plan, measured: `calibrated` (Grams, alignment), then for
    ``gram_inputs: merged`` the Grams of the merged model's inputs, block after block (`_refit_in_order`; with a
    merged vocabulary, `_refit_on_first_pass`), then for methods that fit blocks (``Need.BLOCK_FEATURES``)
    every block fitted in order, from the method's per-tensor merge."""
    needs = plan.needs
    if Need.MERGED_INPUTS in needs:
        # The block-wise refit runs the reference model as its student, which cannot read a vocabulary the
        # merge grows: that merge measures a whole first pass written with the merged tokenizer instead.
        refit = _refit_in_order if plan.vocabulary is None else _refit_on_first_pass
        calibrated = refit(plan, out_dir, device, calibrated, progress, should_cancel)
    if Need.BLOCK_FEATURES not in needs:
        return calibrated

    def inputs(name: str) -> list[torch.Tensor]:
        return read_inputs(plan, name)

    def start(name: str) -> Merged:
        tensor, info = merge_tensor(plan, name, read_inputs(plan, name), device, torch.float32,
                                    calibration=calibrated.for_tensor(name))
        return Merged(tensor, info)

    fitted, blocks = fit_blocks(plan, calibrated.datasets, device, inputs, start, progress=progress,
                                should_cancel=should_cancel)
    return replace(calibrated, report={**calibrated.report, "blocks": blocks}, fitted=fitted)


def _refit_in_order(plan: MergePlan, out_dir: Path, device: torch.device, calibrated: Calibrated,
                    progress: ProgressFn | None, should_cancel: CancelFn | None) -> Calibrated:
    """`calibrated` for ``gram_inputs: merged`` as RegMean++ orders it: each block (projector, decoder or
    encoder layer) fitted on the inputs that the merged blocks below it, already refitted, feed it
    (`refit_blocks`). `out_dir` is unused: nothing is written beside the output."""

    # Each block is measured with its neighbours as the output will hold them: in the output's dtype.
    dtypes = {o.name: o.dtype for o in plan.outputs}

    def merged(name: str, calibration: Calibration) -> torch.Tensor:
        return merge_tensor(plan, name, read_inputs(plan, name), device, dtypes.get(name, torch.float32),
                            calibration=calibration)[0]

    tensors, blocks = refit_blocks(plan, calibrated.datasets, device, lambda n: read_inputs(plan, n), merged,
                                   calibrated.tensors, progress=progress, should_cancel=should_cancel)
    report = {**calibrated.report, "gram_inputs": "merged", "passes": 2, "refit_blocks": blocks}
    return replace(calibrated, report=report, tensors=tensors)


def _refit_on_first_pass(plan: MergePlan, out_dir: Path, device: torch.device, calibrated: Calibrated,
                         progress: ProgressFn | None, should_cancel: CancelFn | None) -> Calibrated:
    """`calibrated` for ``gram_inputs: merged``: merge once as usual, then measure each
    layer's inputs in that model against the experts' own (for the second pass).

    The first pass has no ``cross_grams``, so the method fits on the experts' own
    inputs, as with ``gram_inputs: expert``. Its model lives in a hidden folder
    beside `out_dir` (the output's disk, not /tmp's), removed whatever happens.
    """
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.first-pass-", dir=out_dir.parent) as tmp:
        first = Path(tmp)
        first_pass_progress = _with_message(progress, "first pass: each layer fitted on the experts' own inputs")
        write_shards(plan, first, device, first_pass_progress, should_cancel, calibrated=calibrated)
        write_side_files(plan, first)  # config, processor and tokenizer, so it loads as the output will
        return merged_input_calibration(plan, first, calibrated, device, progress=progress, should_cancel=should_cancel)


def _with_message(progress: ProgressFn | None, message: str) -> ProgressFn | None:
    """`progress` with `message` on the reports that carry none, so a listener can tell the passes apart."""
    if progress is None:
        return None
    return lambda p: progress(p if p.message else replace(p, message=message))


def _evaluated_models(plan: MergePlan, folder: Path) -> dict[str, Path]:
    """Label -> folder of the models to evaluate: the merged one (first), then with
    `evaluate_inputs` the base and each expert (labelled by its spec `model`)."""
    models = {"merged": folder}
    if plan.spec.evaluate_inputs:
        if plan.base is not None:
            models["base"] = plan.base.path
        for i, (entry, repo) in enumerate(zip(plan.spec.models, plan.models)):
            models[entry.model if entry.model not in models else f"{entry.model} ({i})"] = repo.path
    return models

def write_side_files(plan: MergePlan, folder: Path) -> None:
    """The base's config and processor, and the tokenizer of the merged vocabulary where the spec merges one."""
    carry_side_files(plan.reference.path, folder, plan.spec.dtype)
    if plan.vocabulary is not None:
        write_tokenizer(plan.reference.path, folder, plan.vocabulary)


def finish_output(plan: MergePlan, folder: Path, device: torch.device, entries: Sequence[MergedTensor],
                  files: Sequence[WrittenFile], timings: Timings, started: float,
                  calibration: Mapping[str, Any] | None = None, evaluation: Evaluation | None = None) -> MergeReport:
    """Beside the shards and side files written in `folder`: the merge report (with the calibration stage's
    and the evaluation's sections, when given) and the model card. `started` is the merge's start on
    time.perf_counter's clock (the report's total time); returns the report."""
    report = build_report(plan, device, entries, files, timings, time.perf_counter() - started)
    if calibration:
        report.calibration = CalibrationReport.model_validate(calibration)
    report.evaluation = evaluation
    write_report(folder, report)
    write_model_card(folder, plan, report)
    return report
