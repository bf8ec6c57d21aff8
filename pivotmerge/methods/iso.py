"""Isotropic merging (Marczak et al. 2025, "No task left behind").

``iso_c`` flattens the spectrum of the summed task update; ``iso_cts`` adds
task-specific directions orthogonal to the common subspace before flattening.
Tensors that are not 2-D take task arithmetic.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Merged, MethodParams, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import (add_weighted_deltas, column_weights, onto_base, stacked_deltas,
                                               weighted_sum)
from pivotmerge.methods.toolkit.spectrum import flatten_spectrum, significant
from pivotmerge.methods.toolkit.svd import SvdMode, orthogonalize, svd
from pivotmerge.methods.fields import Scale, scale_field


class IsoCParams(MethodParams):
    scale: Scale = scale_field("alpha")


class IsoCTSParams(IsoCParams):
    common_space_fraction: Annotated[float, Search(0.5, 0.95)] = Field(
        0.8, ge=0, le=1,
        description="Share of min(m, n) directions taken from the summed update's top singular vectors.")
    svd: SvdMode = Field("exact", description="Truncated SVDs: exact, or seeded randomized low-rank.")


def _task_arithmetic(tensors: Sequence[Tensor], base: Tensor, weights: Sequence[float], scale: float) -> Merged:
    return Merged(add_weighted_deltas(base, (t - base for t in tensors), weights, scale))


@method("iso_c", summary="Iso-C: SVD of the summed task update with every singular value replaced by their mean.",
        params=IsoCParams)
def iso_c(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
          params: IsoCParams, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return _task_arithmetic(tensors, base, weights, params.scale)
    # The full spectrum is needed for its mean, so this SVD is always exact.
    u, s, vh = svd(weighted_sum((t - base for t in tensors), weights))
    flat = flatten_spectrum(s, base.shape)
    delta = (u * flat) @ vh
    return Merged(onto_base(delta, base, params.scale), {"rank": int((flat > 0).sum()), "sigma": float(flat.max())})


def iso_cts_ranks(full: int, k: int, fraction: float) -> tuple[int, int]:
    """Common rank and per-task rank, as the authors split them: the task ranks share what the
    common space leaves, rounded so the whole rank ``full`` is used, ``c = R - K round((R - int(f R)) / K)``
    and ``(R - c) / K`` per task (R = 96, K = 3, f = 0.8: 75 + 3 x 7). At least one common direction."""
    common = max(1, full - k * round((full - int(fraction * full)) / k))
    return common, (full - common) // k


@method("iso_cts", summary="Iso-CTS: common subspace of the summed update plus task-specific orthogonal directions, "
                           "flattened spectrum.", params=IsoCTSParams)
def iso_cts(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
            params: IsoCTSParams, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return _task_arithmetic(tensors, base, weights, params.scale)
    common, specific = iso_cts_ranks(min(base.shape), len(tensors), params.common_space_fraction)
    deltas = stacked_deltas(tensors, base)
    deltas.mul_(column_weights(weights, deltas))
    u_c, s_c, vh_c = significant(*svd(deltas.sum(dim=0), common, params.svd, generator), base.shape)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    if specific:
        # Each task's own directions, outside the common subspace.
        deltas.sub_(u_c @ (u_c.T @ deltas))
        for d in deltas:
            u, s, vh = significant(*svd(d, specific, params.svd, generator), base.shape)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    s_all = torch.cat(ss)
    flat = flatten_spectrum(s_all, base.shape)
    u_perp = orthogonalize(torch.cat(us, dim=1))
    vh_perp = orthogonalize(torch.cat(vhs, dim=0))
    delta = (u_perp * flat) @ vh_perp
    info = {"common_rank": int(s_c.numel()), "task_rank": specific}
    return Merged(onto_base(delta, base, params.scale), info)

