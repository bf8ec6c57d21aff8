"""Weight-distance metrics between the modality experts a fold spec would fold (Sung et al.'s
predictors of merge success), per layer and in total: `pivotmerge analyze FOLD_SPEC`.

Every folded tensor compares its modalities' versions pairwise (``v``-``l``, and with
``vl`` where the top blocks have it), on the weights themselves (what interpolation and
RegMean fold) or, with ``w0_model``, on the task vectors ``W_m - W0``; per-layer and total
values are numel-weighted means (pivotmerge.analysis.metrics, docs/metrics.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pivotmerge.analysis.metrics import TensorMetrics, aggregate, pairwise
from pivotmerge.errors import MergeCancelled
from pivotmerge.fold.fold_repo import FoldJobSpec, fold_spec_from_dict
from pivotmerge.fold.folding import fold_plan
from pivotmerge.fold.tables import table_for
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.repos.model_repo import ModelRepo, resolve_roots

_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return f"layer.{m.group(1)}" if m else "other"


def fold_distances(spec: FoldJobSpec | Mapping[str, Any], *, allowed_roots: Sequence[str | Path] | None = None,
                   relative_to: Path | None = None, progress: ProgressFn | None = None,
                   should_cancel: CancelFn | None = None) -> dict[str, Any]:
    """Metrics between the modalities of every tensor `spec` folds, per layer and in total."""
    spec = spec if isinstance(spec, FoldJobSpec) else fold_spec_from_dict(dict(spec))
    roots = resolve_roots(allowed_roots)
    with ModelRepo.open(spec.model, allowed_roots=roots, relative_to=relative_to) as repo:
        table = table_for(repo.model_type) if spec.groups is None else None
        spec = spec.with_groups(table.groups) if table is not None else spec
        folded = fold_plan(list(repo.tensors), spec)
        w0 = ModelRepo.open(spec.w0_model, allowed_roots=roots, relative_to=relative_to) if spec.w0_model else None
        try:
            records = []
            for i, (target, sources) in enumerate(folded.items()):
                if should_cancel is not None and should_cancel():
                    raise MergeCancelled("analysis cancelled")
                if progress is not None:
                    progress(Progress("analyze", i, len(folded), tensor=target))
                tensors = [repo.get(s).float() for s in sources.values()]
                base = w0.get(target).float() if w0 is not None and target in w0.tensors else None
                records.append(TensorMetrics(target, layer_of(target), tensors[0].numel(), pairwise(tensors, base)))
        finally:
            if w0 is not None:
                w0.close()
    if progress is not None:
        progress(Progress("analyze", len(folded), len(folded)))
    summary = aggregate(records)
    return {"models": [spec.model], "base_model": spec.w0_model, "modalities": list(spec.name_maps),
            "compared": "task vectors (W_m - W0)" if spec.w0_model else "weights of the modality experts",
            "tensors": len(records), "layers": summary["layers"], "total": summary["total"]}
