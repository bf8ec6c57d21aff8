"""Expert folding of a model repo: `pivotmerge.fold.fold` (the `pivotmerge fold` command's engine).

Reads the repo lazily (headers first, then one folded tensor's sources at a
time), folds each group with pivotmerge.folding, and writes sharded safetensors
into a hidden folder moved into place when complete, with the source's config
and tokenizer files, fold_report.json and a model card. A fold spec is the
FoldSpec fields plus where the model is:

    model: vlmo-like                     # folder or hub id, relative to the spec file
    method: modality_arithmetic          # interpolation | modality_arithmetic | regmean
    lambda: 0.5
    groups:
      vision: {pattern: '\\.mlp\\.vision\\.', replace: '.mlp.'}
      text:   {pattern: '\\.mlp\\.text\\.',   replace: '.mlp.'}
    w0_model: pretrained                 # optional: the untouched shared weights (W0)

`groups` may be left out for a family with a folding table (pivotmerge.fold.tables): the
table's maps are used and the output's config becomes the shared model's, so the folded
folder loads with `AutoModel.from_pretrained`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from pivotmerge.version import __version__
from pivotmerge.plan.device import DTYPES, resolve_device
from pivotmerge.errors import CompatibilityError, MergeCancelled, SpecError
from pivotmerge.fold.folding import FoldSpec, fold_plan, fold_tensor
from pivotmerge.fold.tables import folded_config, table_for
from pivotmerge.repos.output import FOLD_REPORT_FILE, building, carry_side_files, check_out_dir
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.repos.model_repo import ModelRepo, resolve_roots
from pivotmerge.spec.schema import ByteSize, DatasetRef, format_validation_error
from pivotmerge.repos.writer import OutputTensor, ShardWriter
from pivotmerge.report.merge_report import output_files, versions, write_json
from pivotmerge.run.engine import write_tensors

Folded = dict[str, dict[str, str]]  # folded name -> {modality: source tensor name}


class FoldJobSpec(FoldSpec):
    """A FoldSpec with the model it folds and how the output is written."""

    model: str = Field(
        ..., description="The model to fold: a folder, or hub id 'org/name[@revision]' from the local cache.")
    w0_model: str | None = Field(
        None, description="modality_arithmetic: a model holding the untouched shared weights W0 under the folded names "
                          "(e.g. the pre-trained model the experts were split from); default: the model's own "
                          "tensors of those names.")
    calibration: DatasetRef | None = Field(
        None, description="regmean on LLaVA-style models: image-text pairs whose layer inputs give each "
                          "modality's Gram matrices.")
    calibration_inputs: list[str] | None = Field(
        None, description="regmean on any AutoModel: safetensors files of forward-pass keyword arguments (batched), "
                          "run through the model's own routed forward pass for each modality's Gram matrices; one "
                          "file per kind of input (e.g. images, texts, pairs) so every expert sees its tokens.")

    @field_validator("calibration_inputs", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Output dtype; default: the model's.")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where Gram matrices are collected.")
    out_shard_size: ByteSize = Field(2 * 10**9, gt=0, description="Largest output shard, bytes or e.g. '2GB'.")

    @model_validator(mode="after")
    def _data_fits_method(self) -> "FoldJobSpec":
        given = [f for f in ("calibration", "calibration_inputs") if getattr(self, f) is not None]
        if self.method == "regmean" and len(given) != 1:
            raise ValueError("calibration: regmean folding needs one of calibration (a dataset) or calibration_inputs "
                             "(model inputs) for the Gram matrices" + (", not both" if given else ""))
        if self.method != "regmean" and given:
            raise ValueError(f"{given[0]}: only regmean folding uses calibration data, not {self.method}")
        if self.method != "modality_arithmetic" and self.w0_model is not None:
            raise ValueError(f"w0_model: only modality_arithmetic folding uses W0, not {self.method}")
        return self


def fold_spec_from_dict(data: Any) -> FoldJobSpec:
    if not isinstance(data, dict):
        raise SpecError("fold spec: expected a mapping at the top level")
    try:
        return FoldJobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def output_tensors(repo: ModelRepo, folded: Folded, dtype: torch.dtype | None) -> list[OutputTensor]:
    """The output's tensors in the repo's order: a folded tensor where its first source was,
    the sources and any old copy of the folded name dropped, the rest kept."""
    first_source = {next(iter(sources.values())): target for target, sources in folded.items()}
    dropped = {s for sources in folded.values() for s in sources.values()} | set(folded)
    out = []
    for name, info in repo.tensors.items():
        if name in first_source or name not in dropped:
            cast = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
            out.append(OutputTensor(first_source.get(name, name), info.shape, cast))
    return out


def _w0_repo(spec: FoldJobSpec, repo: ModelRepo, folded: Folded, roots: Sequence[Path] | None,
             relative_to: Path | None) -> ModelRepo | None:
    """The repo holding W0 for modality arithmetic, checked to have every folded tensor in the right shape."""
    if spec.method != "modality_arithmetic":
        return None
    w0 = ModelRepo.open(spec.w0_model, allowed_roots=roots, relative_to=relative_to) if spec.w0_model else repo
    for target, sources in folded.items():
        want = repo.tensors[next(iter(sources.values()))].shape
        got = w0.tensors.get(target)
        if got is None or got.shape != want:
            if w0 is not repo:
                w0.close()
            field = "w0_model" if spec.w0_model else "model"
            problem = "has no tensor" if got is None else f"has shape {list(got.shape)} for"
            raise CompatibilityError(f"{field}: {w0.ref} {problem} {target} (W0 for modality_arithmetic, "
                                     f"shape {list(want)}); give w0_model, the untouched shared weights")
    return w0


def _grams(spec: FoldJobSpec, repo: ModelRepo, folded: Folded, roots: Sequence[Path] | None,
           relative_to: Path | None, progress: ProgressFn | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gram matrices of each source tensor's inputs on the calibration set (regmean only), and their report."""
    sources = sorted(s for group in folded.values() for s in group.values())
    if spec.calibration_inputs:
        from pivotmerge.fold.grams import collect_routed_grams, load_inputs

        paths = [Path(p) for p in spec.calibration_inputs]
        inputs = [load_inputs(relative_to / p if relative_to is not None and not p.is_absolute() else p, roots)
                  for p in paths]
        if progress is not None:
            progress(Progress("calibrate", 0, 1, message=f"calibration inputs: {', '.join(p.name for p in paths)}"))
        grams = collect_routed_grams(repo.path, inputs, sources, device=resolve_device(spec.device).type)
        samples = sum(next(iter(i.values())).shape[0] for i in inputs)
        return grams, {"inputs": [str(p) for p in paths], "samples": samples, "gram_tensors": sorted(grams)}
    if spec.calibration is None:
        return {}, {}
    from pivotmerge.data.calibration import collect_grams
    from pivotmerge.data.datasets import load_ref

    dataset = load_ref(spec.calibration, allowed_roots=roots, relative_to=relative_to)
    if progress is not None:
        progress(Progress("calibrate", 0, 1, message=f"calibration data: {dataset.name}"))
    grams = collect_grams(repo.path, dataset, sources, device=resolve_device(spec.device).type)
    return grams, {"dataset": str(dataset.path), "samples": len(dataset.records), "gram_tensors": sorted(grams)}


def _write_folded(repo: ModelRepo, w0: ModelRepo | None, spec: FoldJobSpec, folded: Folded,
                  grams: Mapping[str, torch.Tensor],
                  folder: Path, progress: ProgressFn | None, should_cancel: CancelFn | None) -> list[dict[str, Any]]:
    """Fold and write every output tensor, one at a time; returns the written files' report."""
    outputs = output_tensors(repo, folded, DTYPES[spec.dtype] if spec.dtype else None)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, out in enumerate(outputs):
            if should_cancel is not None and should_cancel():
                raise MergeCancelled("fold cancelled")
            if progress is not None:
                progress(Progress("fold", i, len(outputs), tensor=out.name))
            sources = folded.get(out.name)
            if sources is None:
                tensor = repo.get(out.name)
            else:
                have_grams = all(s in grams for s in sources.values())
                tensor_grams = {m: grams[s] for m, s in sources.items()} if have_grams else None
                tensor = fold_tensor({m: repo.get(s) for m, s in sources.items()}, spec,
                                     w0.get(out.name) if w0 is not None else None, tensor_grams)
            yield out.name, tensor.to(out.dtype)

    writer = ShardWriter(folder, outputs, spec.out_shard_size, metadata={"folded_by": f"pivotmerge {__version__}"})
    files = write_tensors(writer, tensors())
    if progress is not None:
        progress(Progress("fold", len(outputs), len(outputs)))
    return [f.model_dump() for f in output_files(files)]


def fold(spec: FoldJobSpec | Mapping[str, Any], out_dir: str | Path, *, progress: ProgressFn | None = None,
         should_cancel: CancelFn | None = None, allowed_roots: Sequence[str | Path] | None = None,
         relative_to: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Fold the modality-specific groups of `spec.model` into `out_dir`; returns the report
    (also written as fold_report.json). Nothing is left behind on error or cancellation."""
    started = time.perf_counter()
    spec = spec if isinstance(spec, FoldJobSpec) else fold_spec_from_dict(dict(spec))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    roots = resolve_roots(allowed_roots)
    with ModelRepo.open(spec.model, allowed_roots=roots, relative_to=relative_to) as repo:
        table = table_for(repo.model_type) if spec.groups is None else None
        if table is not None:
            spec = spec.with_groups(table.groups)
        folded = fold_plan(list(repo.tensors), spec)
        w0 = _w0_repo(spec, repo, folded, roots, relative_to)
        try:
            grams, calibration = _grams(spec, repo, folded, roots, relative_to, progress)
            with building(out_dir) as partial:
                files = _write_folded(repo, w0, spec, folded, grams, partial, progress, should_cancel)
                carry_side_files(repo.path, partial, spec.dtype)
                if table is not None:
                    config = partial / "config.json"
                    config.write_text(json.dumps(folded_config(json.loads(config.read_text()), table), indent=2) + "\n")
                report = _fold_report(spec, folded, files, calibration, time.perf_counter() - started)
                _write_report_and_card(partial, spec, report)
        finally:
            if w0 is not None and w0 is not repo:
                w0.close()
    if progress is not None:
        progress(Progress("done", 1, 1))
    return report


def _fold_report(spec: FoldJobSpec, folded: Folded, files: list[dict[str, Any]], calibration: dict[str, Any],
                 total_s: float) -> dict[str, Any]:
    return {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions().model_dump(),
            "spec": spec.model_dump(mode="json", by_alias=True), "method": spec.method,
            "folded": {t: dict(s) for t, s in folded.items()}, "files": files,
            **({"calibration": calibration} if calibration else {}), "timings": {"total_s": round(total_s, 4)}}


def _write_report_and_card(folder: Path, spec: FoldJobSpec, report: dict[str, Any]) -> None:
    write_json(folder, FOLD_REPORT_FILE, report)
    formula = {"interpolation": "sum_m w_m W_m / sum_m w_m",
               "modality_arithmetic": f"W0 + {spec.scale} * sum_m (W_m - W0)",
               "regmean": "RegMean over the modalities with each modality's input Gram matrices"}[spec.method]
    lines = ["---", "library_name: transformers", "tags: [folded, pivotmerge]", "---", "",
             f"# Folded with PivotMerge ({spec.method})", "",
             f"`{spec.model}` with its modality groups ({', '.join(spec.name_maps)}) folded into one shared group: "
             f"{formula}, for {len(report['folded'])} tensors.", "",
             f"Made with pivotmerge {__version__}. `{FOLD_REPORT_FILE}` lists every folded tensor and its sources.", ""]
    (folder / "README.md").write_text("\n".join(lines))
