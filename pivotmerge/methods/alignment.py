"""PivotMerge's alignment-guided layer-wise fit (data mode): each block refined from the closed form.

Our reading of the paper's "alignment-guided layer-wise merging" (docs/methods.md): the block's tensors
start at PivotMerge's closed-form merge (the Gram-weighted fit on the merged model's inputs) and are
fitted, block after block, to an alignment objective on the calibration data: each expert's own block
outputs on its own samples, the block seeing the merged model's features (`objective: features`), or the
frozen language model's next-token distributions of each expert on its captions (`objective: captions`).
What is fitted: a free update of every tensor (``distill_parameters: weights``), or a coefficient per
tensor (layer) and expert on the expert's difference from the start, ``W = W_start + sum_k c_k (W_k - W_start)``
(``coefficients``, starting at 0).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from pivotmerge.methods import Block, Merged, Tensor
from pivotmerge.methods.toolkit.distillation import adam_fit, caption_kl, feature_loss


def aligned_tensors(
    experts: Sequence[Mapping[str, Tensor]], start: Mapping[str, Tensor], names: Sequence[str], parameters: str
) -> tuple[list[Tensor], Callable[[], dict[str, Tensor]]]:
    """The trainable tensors (zero: the start) and the block's tensors as a function of them."""
    if parameters == "weights":
        updates = {n: torch.zeros_like(start[n]) for n in names}
        return list(updates.values()), lambda: {n: start[n] + updates[n] for n in names}
    towards = {n: [e[n] - start[n] for e in experts] for n in names}
    coefficients = torch.zeros(len(experts), len(names), device=start[names[0]].device)
    return [coefficients], lambda: {
        n: start[n] + sum(coefficients[k, j] * t for k, t in enumerate(towards[n])) for j, n in enumerate(names)
    }


def fit_aligned_block(
    experts: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor] | None,
    start: Mapping[str, Tensor],
    weights: Sequence[float],
    params: Any,
    block: Block,
) -> dict[str, Merged]:
    """`start` refined by `params.distill_steps` Adam steps on the alignment objective (`params` are PivotMerge's)."""
    names = list(block.names)
    trainables, merged = aligned_tensors(experts, start, names, params.distill_parameters)

    def loss() -> Tensor:
        if params.distill_objective == "captions":
            return caption_kl(block, merged())
        return feature_loss(block, merged(), weights)

    before, after = adam_fit(trainables, loss, params.distill_steps, params.distill_learning_rate)
    with torch.no_grad():
        out = merged()
    info: dict[str, Any] = {"block": block.path, "loss_start": before, "loss_end": after}
    if params.distill_parameters == "coefficients":
        info["coefficients"] = trainables[0].tolist()
    return {n: Merged(out[n], info) for n in names}
