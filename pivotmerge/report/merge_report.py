"""The merge report (merge_report.json) and the model card (README.md)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from pivotmerge import __version__
from pivotmerge.repos.output import REPORT_FILE
from pivotmerge.repos.writer import WrittenFile
from pivotmerge.plan.plan import MergePlan, Timings



def versions() -> dict[str, str]:
    # Package metadata, not imports: importing transformers alone costs seconds per merge.
    return {"pivotmerge": __version__, "torch": torch.__version__, "transformers": metadata.version("transformers"),
            "safetensors": metadata.version("safetensors"), "python": platform.python_version()}


def build_report(plan: MergePlan, device: torch.device, entries: Sequence[dict[str, Any]],
                 files: Sequence[WrittenFile], timings: Timings, total_s: float) -> dict[str, Any]:
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "spec": plan.spec.model_dump(mode="json"),
        "method": plan.method.name,
        "device": str(device),
        "architecture": plan.architecture.name,
        "tensors": {"total": len(plan.names), "merged": len(plan.merged), "copied": len(plan.names) - len(plan.merged)},
        "layers": list(entries),
        "files": files_json(files),
        "timings": {"total_s": round(total_s, 4), "read_s": round(timings.read_s, 4),
                    "merge_s": round(timings.merge_s, 4), "write_s": round(timings.write_s, 4)},
    }


def files_json(files: Sequence[WrittenFile]) -> list[dict[str, Any]]:
    return [{"name": f.file, "size": f.size, "sha256": f.sha256} for f in files]


def write_report(folder: Path, report: dict[str, Any], name: str = REPORT_FILE) -> None:
    (folder / name).write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_model_card(folder: Path, plan: MergePlan, report: dict[str, Any]) -> None:
    spec = plan.spec
    base = spec.base_model or "none (the experts' mean is the pivot)"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, pivotmerge]",
        *([f"base_model: {spec.base_model}"] if spec.base_model else []),
        "---",
        "",
        f"# Merged with PivotMerge ({plan.method.name})",
        "",
        f"This model merges {len(spec.models)} models with the `{plan.method.name}` method: {plan.method.summary}",
        "",
        f"- Base (pivot): `{base}`",
        *[f"- Model: `{m.model}` (weight {m.weight})" for m in spec.models],
        f"- Components merged: {', '.join(c.value for c in spec.components) if spec.components else 'all'}"
        f" ({report['tensors']['merged']} of {report['tensors']['total']} tensors; the rest are the base's)",
        f"- Parameters: `{json.dumps(spec.parameters, default=str)}`",
        f"- Made with pivotmerge {__version__} in {report['timings']['total_s']:.1f} s on {report['device']}.",
        "",
        "`merge_report.json` records the full spec, the versions, and every per-layer choice.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
