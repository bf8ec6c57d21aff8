"""`pivotmerge analyze`: weight-distance metrics between the models a spec names.

Streams tensor by tensor like a merge, over the tensors the spec would merge,
and reports each metric per layer and in total (see docs/metrics.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pivotmerge.plan.device import resolve_device
from pivotmerge.plan.plan import as_spec, check, plan_merge
from pivotmerge.errors import MergeCancelled, SpecError
from pivotmerge.analysis.metrics import TensorMetrics, aggregate, pairwise
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.spec.schema import MergeSpec


def layer_key(component: str, layer: int | None) -> str:
    return f"{component}.{layer}" if layer is not None else f"{component}.other"


def _require_pairs(spec: MergeSpec) -> None:
    if len(spec.models) < 2:
        raise SpecError("models: analysis compares models, so it needs at least two")


def check_analysis(spec: MergeSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
                   relative_to: Path | None = None, allow_downloads: bool = False) -> None:
    """`check` for an analysis: also refuses a spec with fewer than two models."""
    spec = as_spec(spec)
    _require_pairs(spec)
    check(spec, allowed_roots=allowed_roots, relative_to=relative_to, allow_downloads=allow_downloads)


def analyze(spec: MergeSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
            relative_to: Path | None = None, progress: ProgressFn | None = None,
            should_cancel: CancelFn | None = None, allow_downloads: bool = False) -> dict[str, Any]:
    """Metrics averaged over all pairs of models, on task vectors when the spec has a base."""
    spec = as_spec(spec)
    _require_pairs(spec)
    with plan_merge(spec, allowed_roots=allowed_roots, relative_to=relative_to,
                    allow_downloads=allow_downloads) as plan:
        device = resolve_device(plan.spec.device)
        names = [n for n in plan.names if n in plan.merged]
        records = []
        for i, name in enumerate(names):
            if should_cancel is not None and should_cancel():
                raise MergeCancelled("analysis cancelled")
            place = plan.places[name]
            if progress is not None:
                progress(Progress("analyze", i, len(names), tensor=name, layer=place.layer))
            tensors = [m.get(name).to(device=device, dtype=torch.float32) for m in plan.models]
            base = plan.base.get(name).to(device=device, dtype=torch.float32) if plan.base else None
            records.append(TensorMetrics(name, layer_key(place.component_name, place.layer), tensors[0].numel(),
                                         pairwise(tensors, base)))
        if progress is not None:
            progress(Progress("analyze", len(names), len(names)))
        summary = aggregate(records)
        return {
            "models": [m.ref for m in plan.models],
            "base_model": plan.base.ref if plan.base else None,
            "compared": "task vectors (W - base)" if plan.base else "weights",
            "tensors": len(records),
            "layers": summary["layers"],
            "total": summary["total"],
        }
