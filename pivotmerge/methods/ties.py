"""TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from pydantic import Field

from pivotmerge.methods import MethodParams, Tensor, method, per_model
from pivotmerge.methods.toolkit.consensus import consensus_merge
from pivotmerge.methods.toolkit.deltas import onto_base, stacked_deltas
from pivotmerge.methods.toolkit.pieces import flat_pieces
from pivotmerge.methods.toolkit.sparsify import magnitude_cut
from pivotmerge.methods.fields import Density, Scale, scale_field


class Params(MethodParams):
    scale: Scale = scale_field("lambda")
    density: Density = Field(1.0, description="Fraction of each expert's delta kept, by magnitude (per model).")
    normalize: bool = Field(True, description="Divide by the summed weights of the agreeing experts (disjoint mean).")


@method("ties", summary="Trim each delta to its top-density magnitudes, elect signs by mass, average the agreeing "
                         "entries.",
        params=Params, execution="stored_inputs")
def ties(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
         params: Params, generator: torch.Generator | None = None) -> Tensor:
    """Two passes over flat pieces, so no temporary is larger than a piece: each
    expert's cut-off over its whole delta, then trim, election and disjoint mean
    piece by piece. Same bits as on whole tensors (see ``PIECE``). The inputs may be
    stored in any float dtype (``stored_inputs``): each piece is converted to float32
    as it is read, exactly, so no whole float32 copy of an expert is ever held."""
    assert base is not None
    flat_base = base.reshape(-1)
    experts = [t.reshape(-1) for t in tensors]
    n = flat_base.numel()
    cuts = [magnitude_cut(partial(_delta_piece, x, flat_base), n, density)
            for x, density in zip(experts, per_model(params.density, len(experts), "density"))]
    merged = torch.empty_like(flat_base, dtype=torch.float32)
    for piece in flat_pieces(n):
        deltas = stacked_deltas([x[piece] for x in experts], flat_base[piece].float())
        for d, cut in zip(deltas, cuts):
            cut.apply_(d)
        merged[piece] = consensus_merge(deltas, weights, params.normalize)
    return onto_base(merged.view(base.shape), base, params.scale)


def _delta_piece(expert: Tensor, base: Tensor, piece: slice) -> Tensor:
    return expert[piece].float() - base[piece].float()
