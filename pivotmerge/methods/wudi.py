"""WUDI-Merging (ICML 2025, "Whoever Started the Interference Should End It").

A linear layer's update after fine-tuning is a sum of outer products ``delta x^T``, so the
rows of a task vector ``tau_k`` lie near the span of task ``k``'s inputs, and
``G_k = tau_k^T tau_k / ||tau_k||_F^2`` stands in for that task's input Gram matrix. WUDI
minimises the interference each task's inputs see, for every 2-D weight:

    L(tau) = sum_k w_k ||(tau - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2.

``solver: adam`` is the authors' form (their repository and FusionBench 0.2.33's
``fusion_bench/method/wudi/wudi.py``): Adam (lr 1e-5, no weight decay) for 300 iterations
from ``tau = sum_k tau_k``. ``solver: closed_form`` solves ``dL/dtau = 0`` directly,
RegMean with the task-vector Gram matrices plus a small ridge (our derivation):

    tau = (sum_k w_k tau_k G_k) (sum_k w_k G_k + ridge * mean_diag * I)^-1,

``mean_diag = tr(sum_k w_k G_k) / n``. Other tensors (biases, norms) take the weighted mean
of the task vectors, as FusionBench does. ``W = W0 + scale * tau``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Merged, MethodParams, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas, onto_base, stacked_deltas, weighted_sum
from pivotmerge.methods.fields import Scale, scale_field

# torch.optim.Adam's defaults, which both reference implementations use.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Params(MethodParams):
    solver: Annotated[Literal["adam", "closed_form"], Search(choices=("adam", "closed_form"))] = Field(
        "adam",
        description="adam: the authors' iterations from the sum of the task vectors; closed_form: the objective's "
                            "minimiser, RegMean with task-vector Gram matrices plus a ridge.")
    scale: Scale = scale_field()
    ridge: Annotated[float, Search(1e-4, 1e-1, log=True)] = Field(
        1e-2, ge=0,
        description="closed_form: ridge added to the summed Gram matrices, relative to their mean diagonal entry.")
    iterations: int = Field(300, ge=1, le=100_000, description="adam: optimisation steps (the authors' 300).")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="adam: step size (the authors' 1e-5).")


def surrogate_grams(deltas: Tensor) -> Tensor:
    """``(K, n, n)`` task-vector Grams ``tau_k^T tau_k / ||tau_k||_F^2`` of ``(K, m, n)`` deltas (0 for a zero
    delta)."""
    grams = deltas.mT @ deltas
    norms = deltas.square().sum(dim=(1, 2))
    return grams / torch.where(norms > 0, norms, 1).reshape(-1, 1, 1)


def gram_moments(deltas: Tensor, grams: Tensor, weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``sum_k w_k G_k`` (n x n) and ``sum_k w_k tau_k G_k`` (m x n)."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    return torch.einsum("k,kij->ij", w, grams), torch.einsum("k,kmi,kij->mj", w, deltas, grams)


def ridge_solve(rhs: Tensor, lhs: Tensor, ridge: float) -> Tensor:
    """``rhs (lhs + ridge * tr(lhs)/n * I)^-1`` in float64 (pseudo-inverse where singular)."""
    lhs64 = lhs.double()
    n = lhs64.shape[0]
    lhs64 = lhs64 + ridge * float(torch.diagonal(lhs64).mean()) * torch.eye(n, dtype=lhs64.dtype, device=lhs64.device)
    try:
        out_t = torch.linalg.solve(lhs64, rhs.double().T)
    except torch.linalg.LinAlgError:
        out_t = torch.linalg.pinv(lhs64, hermitian=True) @ rhs.double().T
    return out_t.T.to(rhs.dtype)


def adam_minimise(init: Tensor, gram_sum: Tensor, target: Tensor, iterations: int, lr: float) -> Tensor:
    """torch.optim.Adam's update on ``L(tau)``, whose gradient is ``2 (tau sum_k w_k G_k - sum_k w_k tau_k G_k)``:
    the same steps as autograd on the loss, without a graph (and so also under inference mode)."""
    tau, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
    beta1, beta2 = ADAM_BETAS
    for step in range(1, iterations + 1):
        grad = (tau @ gram_sum).sub_(target).mul_(2)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(ADAM_EPS)
        tau.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    return tau


def wudi_update(deltas: Tensor, weights: Sequence[float], params: Params) -> Tensor:
    """The merged task vector of ``(K, m, n)`` deltas."""
    grams = surrogate_grams(deltas)
    gram_sum, target = gram_moments(deltas, grams, weights)
    if params.solver == "closed_form":
        return ridge_solve(target, gram_sum, params.ridge)
    init = weighted_sum(deltas.unbind(0), weights)
    return adam_minimise(init, gram_sum, target, params.iterations, params.learning_rate)


@method("wudi", summary="WUDI-Merging: per 2-D weight, the update that minimises the interference on each task's "
                        "task-vector Gram (Adam as the authors, or in closed form); other tensors the mean update.",
        params=Params)
def wudi(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
         params: Params, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return Merged(add_weighted_deltas(base, (t - base for t in tensors), weights, params.scale, normalize=True))
    update = wudi_update(stacked_deltas(tensors, base), weights, params)
    return Merged(onto_base(update, base, params.scale), {"solver": params.solver})
