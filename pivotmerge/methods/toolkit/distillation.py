"""Distillation toolkit for methods that fit a block (`Need.BLOCK_FEATURES`): the losses and the Adam loop.

Pure tensor code: the engine hands a method a `Block` (features measured on calibration data and the
block as a differentiable function of its tensors); these turn it into a loss and minimise it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from pivotmerge.methods import Block, Tensor


def feature_loss(block: Block, tensors: Mapping[str, Tensor], expert_weights: Sequence[float] | None = None) -> Tensor:
    """ProDistill's dual-input loss: ``sum_k w_k mean_rows ||f(theta; X~_k) - f_k(X_k)||^2``, each expert's block
    output on its own inputs (`teacher_outputs`) matched by the block run on the merged model's features
    (`student_inputs`) of the same samples; squared errors summed over features, averaged over the rows."""
    terms = []
    for k, (inputs, targets) in enumerate(zip(block.student_inputs, block.teacher_outputs, strict=True)):
        weight = 1.0 if expert_weights is None else float(expert_weights[k])
        errors = [
            (block.forward(tensors, k, b, x) - y).square().sum()
            for b, (x, y) in enumerate(zip(inputs, targets, strict=True))
        ]
        rows = sum(y.numel() // y.shape[-1] for y in targets)
        terms.append(weight * torch.stack(errors).sum() / max(rows, 1))
    return torch.stack(terms).sum()


def caption_kl(block: Block, tensors: Mapping[str, Tensor], temperature: float = 1.0) -> Tensor:
    """``sum_k T^2 KL(p_k^T || p_theta^T)`` averaged over expert ``k``'s caption tokens: the merged model's
    next-token distributions (the block's tensors replaced) against each expert's own on its own data."""
    if block.caption_logits is None or block.teacher_logits is None:
        raise ValueError("caption_kl needs the experts' caption outputs (Need.CAPTION_OUTPUTS)")
    terms = []
    for k, teacher in enumerate(block.teacher_logits):
        student = torch.log_softmax(block.caption_logits(tensors, k) / temperature, dim=-1)
        target = torch.log_softmax(teacher / temperature, dim=-1)
        terms.append((target.exp() * (target - student)).sum(dim=-1).mean() * temperature**2)
    return torch.stack(terms).sum()


def adam_fit(
    trainables: Sequence[Tensor], loss: Callable[[], Tensor], steps: int, learning_rate: float
) -> tuple[float, float]:
    """Minimise `loss` over `trainables` (leaf tensors, changed in place) by `steps` full-batch Adam steps
    at a constant learning rate (a cosine decay scored lower on the quality suite's dev splits);
    returns the loss before and after. Trainables the loss does not reach (a vision layer above the one
    LLaVA reads, under an objective on the captions) are left as they are."""
    for t in trainables:
        t.requires_grad_(True)
    optimiser = torch.optim.Adam(trainables, lr=learning_rate)
    with torch.enable_grad():
        first = None
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            value = loss()
            first = float(value.detach()) if first is None else first
            if not value.requires_grad:
                break
            value.backward()
            optimiser.step()
        with torch.no_grad():
            last = float(loss())
    for t in trainables:
        t.requires_grad_(False)
    return (last if first is None else first), last
