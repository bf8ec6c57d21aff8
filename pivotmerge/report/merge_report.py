"""The merge report (merge_report.json) and the model card (README.md).

`MergeReport` is what `pivotmerge.merge` returns, what it writes as
merge_report.json, and what the CLI, the worker and the API read, by attribute:
one typed record instead of a dict whose keys each reader spells for itself.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml
from pydantic import BaseModel, ConfigDict

from pivotmerge.version import __version__
from pivotmerge.data.evaluate import Evaluation
from pivotmerge.plan.plan import MergePlan, Timings
from pivotmerge.repos.hub import card_data, inputs_report
from pivotmerge.repos.output import REPORT_FILE
from pivotmerge.repos.writer import WrittenFile
from pivotmerge.report.study import StudyReport


class ReportModel(BaseModel):
    """A section of a report: unknown keys are errors, so a section cannot drift from its readers;
    NaN (a metric over no tokens) is written as JSON's NaN, as json.dumps does."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Versions(ReportModel):
    pivotmerge: str
    torch: str
    transformers: str
    safetensors: str
    python: str


def versions() -> Versions:
    # Package metadata, not imports: importing transformers alone costs seconds per merge.
    return Versions(pivotmerge=__version__, torch=torch.__version__, transformers=metadata.version("transformers"),
                    safetensors=metadata.version("safetensors"), python=platform.python_version())


class TensorCounts(ReportModel):
    total: int
    merged: int
    copied: int


class MergedTensor(ReportModel):
    """One merged tensor: where it sits, the weights and parameters it was merged with, and the
    method's recorded choices (ranks kept, directions suppressed, layer scales...)."""

    tensor: str
    component: str
    layer: int | None
    weights: list[float]
    params: dict[str, Any]
    info: dict[str, Any] | None = None  # absent when the method recorded nothing


class OutputFile(ReportModel):
    name: str
    size: int
    sha256: str


def output_files(files: Sequence[WrittenFile]) -> list[OutputFile]:
    return [OutputFile(name=f.file, size=f.size, sha256=f.sha256) for f in files]


class MergeTimings(ReportModel):
    """Seconds: the whole merge, and the time the merge loop spent waiting on reads, merging and writing."""

    total_s: float
    read_s: float
    merge_s: float
    write_s: float


class CalibrationDataset(ReportModel):
    model: str
    dataset: str
    samples: int
    prompt: str  # what preceded each caption (DatasetRef.prompt)


class InputOrigin(ReportModel):
    """A spec input and, for a hub id, the repo and commit it resolved to."""

    field: str
    model: str
    hub_id: str | None = None
    commit: str | None = None


class AppendedToken(ReportModel):
    token: str
    source: str  # the input whose row was taken


class VocabularyReport(ReportModel):
    """What happened to tokens outside the base's vocabulary (docs/families.md)."""

    policy: Literal["base", "union"]
    base_rows: int
    rows: int
    dropped: dict[str, list[str]]  # input -> its tokens left out
    appended: list[AppendedToken]


class AlignmentReport(ReportModel):
    """Per layer group, each expert's caption loss with the group's update removed, and what follows from it."""

    baseline_loss: list[float]
    ablated_loss: dict[str, list[float]]
    contributions: dict[str, list[float]]
    scores: dict[str, list[float]]


class CalibrationReport(ReportModel):
    datasets: list[CalibrationDataset]
    gram_tensors: list[str] | None = None  # methods that read Gram matrices
    alignment: AlignmentReport | None = None  # PivotMerge with layer_weighting: data
    gram_inputs: Literal["merged"] | None = None  # a second pass fitted on the merged model's inputs
    passes: int | None = None
    # gram_inputs: merged, block after block: the blocks refitted on the merged blocks below them, in order.
    refit_blocks: list[str] | None = None
    # Methods that fit blocks: each block, its tensors and its loss before and after the fit.
    blocks: list[dict[str, Any]] | None = None


class MergeReport(ReportModel):
    created_at: str
    versions: Versions
    spec: dict[str, Any]
    method: str
    device: str
    architecture: str  # the family table used (docs/families.md)
    inputs: list[InputOrigin] = []
    tensors: TensorCounts
    vocabulary: VocabularyReport | None = None  # set when an expert's vocabulary extends the base's
    layers: list[MergedTensor]
    files: list[OutputFile]
    timings: MergeTimings
    calibration: CalibrationReport | None = None
    evaluation: Evaluation | None = None  # model label ("merged", "base", each expert) -> metrics per dataset
    study: StudyReport | None = None  # `pivotmerge tune`: the study that chose this merge

    def as_json(self) -> dict[str, Any]:
        """The report as merge_report.json holds it: sections that do not apply are absent, not null."""
        return self.model_dump(mode="json", exclude_defaults=True)


def build_report(plan: MergePlan, device: torch.device, entries: Sequence[MergedTensor],
                 files: Sequence[WrittenFile], timings: Timings, total_s: float) -> MergeReport:
    return MergeReport(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=versions(),
        spec=plan.spec.model_dump(mode="json"),
        method=plan.method.name,
        device=str(device),
        architecture=plan.architecture.name,
        inputs=[InputOrigin(**i) for i in inputs_report(
            [*([("base_model", plan.base.ref, plan.base.path)] if plan.base else []),
             *[(f"models.{i}.model", m.ref, m.path) for i, m in enumerate(plan.models)]])],
        tensors=TensorCounts(total=len(plan.names), merged=len(plan.merged), copied=len(plan.names) - len(plan.merged)),
        vocabulary=VocabularyReport(**plan.vocabulary.report()) if plan.vocabulary is not None else None,
        layers=list(entries),
        files=output_files(files),
        timings=MergeTimings(total_s=round(total_s, 4), read_s=round(timings.read_s, 4),
                             merge_s=round(timings.merge_s, 4), write_s=round(timings.write_s, 4)),
    )


def write_json(folder: Path, name: str, data: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_report(folder: Path, report: MergeReport) -> None:
    write_json(folder, REPORT_FILE, report.as_json())


def read_report(folder: Path) -> MergeReport:
    """The merge_report.json in `folder`."""
    return MergeReport.model_validate_json((folder / REPORT_FILE).read_text())


def write_model_card(folder: Path, plan: MergePlan, report: MergeReport) -> None:
    spec = plan.spec
    base = spec.base_model or "none (the experts' mean is the pivot)"
    lines = [
        "---",
        card_data([i.hub_id for i in report.inputs if i.hub_id], plan.method.name).to_yaml(),
        "---",
        "",
        f"# Merged with PivotMerge ({plan.method.name})",
        "",
        f"This model merges {len(spec.models)} models with the `{plan.method.name}` method: {plan.method.summary}",
        "",
        f"- Base (pivot): `{base}`",
        *[f"- Model: `{m.model}` (weight {m.weight})" for m in spec.models],
        f"- Components merged: {', '.join(c.value for c in spec.components) if spec.components else 'all'}"
        f" ({report.tensors.merged} of {report.tensors.total} tensors; the rest are the base's)",
        f"- Parameters: `{json.dumps(spec.parameters, default=str)}`",
        f"- Made with pivotmerge {__version__} in {report.timings.total_s:.1f} s on {report.device}.",
        "",
        "`merge_report.json` records the full spec, the versions, and every per-layer choice. The spec:",
        "",
        "```yaml",
        yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
