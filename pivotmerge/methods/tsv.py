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
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas, onto_base, stacked_deltas
from pivotmerge.methods.toolkit.spectrum import significant
from pivotmerge.methods.toolkit.svd import SvdMode, low_rank_svds, orthogonalize
from pivotmerge.methods.fields import Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("alpha")
    rank_fraction: float | None = Field(
        None, gt=0, le=1,
        description="Fraction of each task's rank kept (min(m, n) * fraction, at least 1); default 1/K.")
    energy: float = Field(
        1.0, gt=0, le=1,
        description="Rank rule: keep at most the fewest directions holding this share of each task's energy "
                    "(1: rank_fraction alone).")
    svd: SvdMode = Field(
        "auto", description="Per-task SVDs: exact; seeded randomized low-rank; or auto: randomized where it is much "
                            "cheaper and its estimated error is under 1% of the kept part, else exact.")


def task_rank(shape: Sequence[int], fraction: float) -> int:
    """Directions kept per task: ``int(fraction * min(shape))``, at least 1."""
    return max(1, int(fraction * min(shape)))


@method("tsv", summary="Task Singular Vectors: per-task low-rank SVD, decorrelated (orthogonalised) singular "
                        "vectors, rebuilt sum.",
        params=Params)
def tsv(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
        params: Params, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return Merged(add_weighted_deltas(base, (t - base for t in tensors), weights, params.scale))
    rank = task_rank(base.shape, params.rank_fraction or 1 / len(tensors))
    # The tasks' deltas share a shape: one batched SVD instead of K.
    tasks = low_rank_svds(stacked_deltas(tensors, base), rank, params.energy, params.svd, generator)
    us, ss, vhs = [], [], []
    for (u, s, vh, _), w in zip(tasks, weights):
        u, s, vh = significant(u, s, vh, base.shape)
        us.append(u)
        ss.append(s * w)
        vhs.append(vh)
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    delta = (u_perp * torch.cat(ss)) @ vh_perp
    info = {"rank_per_task": [int(u.shape[1]) for u in us], "svd_per_task": [choice.report() for *_, choice in tasks]}
    return Merged(onto_base(delta, base, params.scale), info)
