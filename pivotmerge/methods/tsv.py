"""Task Singular Vectors merging, TSV-Merge (Gargiulo et al., CVPR 2025).

For a 2-D weight, each task's delta is truncated to its top singular directions,
the tasks' left and right singular vectors are concatenated and decorrelated
(replaced by the nearest orthonormal set), and the update is rebuilt from them
with the tasks' own singular values. Other tensors take task arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Merged, MethodParams, Tensor, method
from pivotmerge.methods._ops import SvdMode, add_weighted_deltas, onto_base, orthogonalize, significant, svd
from pivotmerge.methods.fields import Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("alpha")
    rank_fraction: float | None = Field(
        None, gt=0, le=1,
        description="Fraction of each task's rank kept (min(m, n) * fraction, at least 1); default 1/K.")
    svd: SvdMode = Field("exact", description="Per-task SVD: exact, or seeded randomized low-rank.")


def task_rank(shape: Sequence[int], fraction: float) -> int:
    """Directions kept per task: ``int(fraction * min(shape))``, at least 1."""
    return max(1, int(fraction * min(shape)))


@method("tsv", summary="Task Singular Vectors: per-task low-rank SVD, decorrelated (orthogonalised) singular vectors, rebuilt sum.",
        params=Params)
def tsv(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
        params: Params, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return Merged(add_weighted_deltas(base, (t - base for t in tensors), weights, params.scale))
    rank = task_rank(base.shape, params.rank_fraction or 1 / len(tensors))
    us, ss, vhs = [], [], []
    for t, w in zip(tensors, weights):
        u, s, vh = significant(*svd(t - base, rank, params.svd, generator), base.shape)
        us.append(u)
        ss.append(s * w)
        vhs.append(vh)
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    delta = (u_perp * torch.cat(ss)) @ vh_perp
    return Merged(onto_base(delta, base, params.scale), {"rank_per_task": [int(u.shape[1]) for u in us]})

