"""Layer-wise AdaMerging (Yang et al., ICLR 2024) with a distillation objective.

Each merged tensor ``j`` (AdaMerging's "layer": FusionBench's layer-wise merging gives every parameter
tensor its own coefficient) is ``theta_j = theta0_j + sum_k clamp(lambda_kj, 0, 1) tau_kj``, the
coefficients initialised at 0.3 and clamped to [0, 1] as in FusionBench's ``LayerWiseMergedModel``
(``fusion_bench/models/wrappers/layer_wise_fusion.py``). AdaMerging minimises the merged model's
prediction entropy on unlabeled test inputs; we fit the coefficients on the unlabeled calibration inputs
by distillation from each expert instead (Expert Merging's objective, Littleor/ExpertMerging): by default
``sum_k T^2 KL(p_k^T || p_theta^T)`` of the frozen language model's next-token distributions on expert
``k``'s own captions (`objective: captions`), or the block outputs as ProDistill matches them
(`objective: features`). That objective, and fitting block by block (the projector is one block), are our
reading; the coefficients and the merged weights for given coefficients are FusionBench's.
"""

from __future__ import annotations

from typing import Annotated, Literal, Mapping, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import NO_CALIBRATION, Block, Calibration, Merged, MethodParams, Need, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas
from pivotmerge.methods.toolkit.distillation import adam_fit, caption_kl, feature_loss


class Params(MethodParams):
    init_value: float = Field(0.3, description="Initial coefficient of every tensor and expert (FusionBench's 0.3).")
    clamp: bool = Field(True, description="Clamp the coefficients to [0, 1] (FusionBench's clamp_weights).")
    objective: Annotated[Literal["captions", "features"], Search(choices=("captions", "features"))] = Field(
        "captions",
        description="captions: KL of the frozen language model's next-token distributions to each expert's on "
        "its own calibration captions; features: each expert's block outputs on its own inputs.",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the captions objective (scaled by T^2).")
    learning_rate: Annotated[float, Search(1e-3, 1e-1, log=True)] = Field(
        0.01, gt=0, description="Adam's learning rate."
    )
    steps: Annotated[int, Search(20, 400)] = Field(100, ge=0, description="Full-batch Adam steps per block.")


def needs(params: Params) -> set[Need]:
    return {Need.BLOCK_FEATURES, Need.CAPTION_OUTPUTS} if params.objective == "captions" else {Need.BLOCK_FEATURES}


def combine(
    base: Mapping[str, Tensor],
    taus: Mapping[str, Sequence[Tensor]],
    coefficients: Tensor,
    names: Sequence[str],
    clamp: bool,
) -> dict[str, Tensor]:
    """``theta_j = theta0_j + sum_k c_kj tau_kj`` for coefficients ``c`` (experts x tensors), clamped to [0, 1]
    if `clamp`."""
    c = coefficients.clamp(0, 1) if clamp else coefficients
    return {n: base[n] + sum(c[k, j] * t for k, t in enumerate(taus[n])) for j, n in enumerate(names)}


def fit_block(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None,
    start: Mapping[str, Tensor],
    weights: Sequence[float],
    params: Params,
    block: Block,
) -> dict[str, Merged]:
    assert base is not None  # the registry marks base as required
    names = list(block.names)
    taus = {n: [e[n] - base[n] for e in experts] for n in names}
    device = base[names[0]].device
    coefficients = torch.tensor([[params.init_value * w] * len(names) for w in weights], device=device)

    def loss() -> Tensor:
        merged = combine(base, taus, coefficients, names, params.clamp)
        return (
            caption_kl(block, merged, params.temperature)
            if params.objective == "captions"
            else feature_loss(block, merged)
        )

    before, after = adam_fit([coefficients], loss, params.steps, params.learning_rate)
    with torch.no_grad():
        out = combine(base, taus, coefficients, names, params.clamp)
    final = coefficients.clamp(0, 1) if params.clamp else coefficients
    return {
        n: Merged(
            out[n],
            {
                "block": block.path,
                "loss_start": before,
                "loss_end": after,
                "coefficients": [float(c) for c in final[:, j]],
            },
        )
        for j, n in enumerate(names)
    }


@method(
    "adamerging",
    summary="Layer-wise AdaMerging: a coefficient per tensor and expert, clamped to [0, 1], fitted by "
    "distillation from each expert on its own unlabeled calibration data.",
    params=Params,
    base="required",
    needs=needs,
    fit_block=fit_block,
)
def adamerging(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weights: Sequence[float],
    params: Params,
    generator: torch.Generator | None = None,
    calibration: Calibration = NO_CALIBRATION,
) -> Tensor:
    """The start of the fit (every coefficient at `init_value`), which `fit_block` then refines."""
    assert base is not None
    return add_weighted_deltas(base, (t - base for t in tensors), weights, params.init_value)
