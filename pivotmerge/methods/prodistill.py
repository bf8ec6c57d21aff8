"""ProDistill (Xu et al., ICML 2025): progressive layer-wise distillation with element-wise coefficients.

Each block (the projector; a decoder or encoder layer) is ``theta = theta0 + sum_k alpha_k * tau_k`` with an
element-wise coefficient ``alpha_k`` per entry of every task vector ``tau_k = theta_k - theta0`` of the block,
initialised at 0.3 (the authors' ``init_scale``). Blocks are fitted in order, each by Adam (lr 0.01) on the
dual-input loss ``sum_k mean_rows ||f(theta; X~_k) - f(theta_k; X_k)||^2`` (`distillation.feature_loss`):
the merged block sees the merged model's features of expert ``k``'s calibration samples, the teacher (only
expert ``k``, on its own domain) its own. Read from the authors' code (JingXuTHU/Scalable_Model_Merging_with_
Progressive_Layerwise_Distillation, Vision/main_prodistill.py and merge_models.py::MergedModel); the engine
measures the features and propagates both streams block after block.
"""

from __future__ import annotations

from typing import Annotated, Mapping, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import NO_CALIBRATION, Block, Calibration, Merged, MethodParams, Need, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas
from pivotmerge.methods.toolkit.distillation import adam_fit, feature_loss


class Params(MethodParams):
    init_scale: float = Field(
        0.3, description="Initial coefficient of every entry of every task vector (the authors' 0.3)."
    )
    learning_rate: Annotated[float, Search(1e-3, 1e-1, log=True)] = Field(
        0.01, gt=0, description="Adam's learning rate (the authors' 0.01)."
    )
    steps: Annotated[int, Search(20, 400)] = Field(100, ge=0, description="Full-batch Adam steps per block.")


def needs(params: Params) -> set[Need]:
    return {Need.BLOCK_FEATURES}


def fit_block(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None,
    start: Mapping[str, Tensor],
    weights: Sequence[float],
    params: Params,
    block: Block,
) -> dict[str, Merged]:
    """The block's coefficients fitted by distillation; each tensor ``theta0 + sum_k alpha_k * tau_k``."""
    assert base is not None  # the registry marks base as required
    taus = {n: [e[n] - base[n] for e in experts] for n in block.names}
    alphas = {n: [torch.full_like(base[n], params.init_scale * w) for w in weights] for n in block.names}

    def merged() -> dict[str, Tensor]:
        return {n: base[n] + sum(a * t for a, t in zip(alphas[n], taus[n])) for n in block.names}

    before, after = adam_fit(
        [a for per in alphas.values() for a in per],
        lambda: feature_loss(block, merged()),
        params.steps,
        params.learning_rate,
    )
    with torch.no_grad():
        out = merged()
    return {
        n: Merged(
            out[n],
            {
                "block": block.path,
                "loss_start": before,
                "loss_end": after,
                "mean_alpha": [float(a.mean()) for a in alphas[n]],
            },
        )
        for n in block.names
    }


@method(
    "prodistill",
    summary="ProDistill: block by block, element-wise task-vector coefficients fitted by dual-input "
    "distillation of each expert's block outputs on its own calibration data.",
    params=Params,
    base="required",
    needs=needs,
    fit_block=fit_block,
)
def prodistill(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weights: Sequence[float],
    params: Params,
    generator: torch.Generator | None = None,
    calibration: Calibration = NO_CALIBRATION,
) -> Tensor:
    """The start of the fit (every coefficient at `init_scale`), which `fit_block` then refines."""
    assert base is not None
    return add_weighted_deltas(base, (t - base for t in tensors), weights, params.init_scale)
