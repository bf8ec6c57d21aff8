"""ACE-Merging (CVPR 2026, arXiv 2603.02945, "Adaptive Covariance Estimation"), its closed form.

As in WUDI, a task vector's rows estimate its task's input covariance; ACE then solves
RegMean's closed form once per 2-D weight. For task vectors ``tau_t`` (``m x n``), as the
authors' ``src/merge/strategy.py::ace_merging`` (unravel-xu/ACE-Merging) computes it:

1. heterogeneity: ``l_t = log(tr(tau_t^T tau_t) + 1e-12)``,
   ``gamma = var(l) / (mean(l)^2 + 1e-12)`` (unbiased variance); ``flag = gamma > 0.3``;
2. row-centring ``c_t = tau_t - mean over rows(tau_t)``, ``S_t = c_t^T c_t``; with ``flag``
   each is trace-normalised, ``S_t / (tr S_t + 1e-12)``, and ``eps_t = eps / (tr S_t + 1e-12)``
   (else ``eps_t = eps``);
3. ``tau_0 = [sum_t c_t (S_t + eps_t I)] [sum_t (S_t + eps_t I) + 1 p^T]^-1``, where the
   "collective prior" ``p^T`` is the column mean of ``sum_t S_t`` (a row added to every row of
   the system), divided by the mean raw trace ``mean_t tr(tau_t^T tau_t)`` under ``flag``;
4. under ``flag``, spectral refinement: ``D = tau_0 + sum_t tau_t (S_t - S_mean)`` with
   ``S_mean = (1/T) sum_t (S_t + eps_t I)``, ``D = U diag(s) V^T``; with ``k = int(k_frac * rank)``
   the update gains ``mean(s_1..s_k) U_k V_k^T``.

``W = W0 + scale * update``; other tensors take the mean task vector (as the authors').
The model weights ``w_t`` (the authors' method has none: all 1) weigh each task's terms in
every sum over ``t``, and the means over ``t`` become weighted means.
"""

from __future__ import annotations

from typing import Annotated, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import Merged, MethodParams, Search, Tensor, method
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas, onto_base, stacked_deltas
from pivotmerge.methods.toolkit.svd import exact_svd
from pivotmerge.methods.fields import Scale, scale_field

# The authors' constants: the heterogeneity threshold and the guards of their logs and divisions.
HETEROGENEITY = 0.3
TINY = 1e-12


class Params(MethodParams):
    scale: Scale = scale_field()
    eps: Annotated[float, Search(1e-4, 1.0, log=True)] = Field(
        1e-2, gt=0,
        description="Ridge on each covariance estimate (divided by its trace when the experts are heterogeneous).")
    k_frac: Annotated[float, Search(0.0, 1.0)] = Field(
        0.3, ge=0, le=1,
        description="Share of the refined update's rank that gets the isotropic boost (heterogeneous experts only).")


def heterogeneous(deltas: Tensor) -> tuple[bool, Tensor]:
    """ACE's flag ``var(log tr) / mean(log tr)^2 > 0.3`` and the raw traces ``tr(tau_t^T tau_t)``."""
    traces = deltas.double().square().sum(dim=(1, 2))
    logs = torch.log(traces + TINY)
    gamma = logs.var() / (logs.mean().square() + TINY) if len(logs) > 1 else torch.zeros((), dtype=logs.dtype)
    return bool(gamma > HETEROGENEITY), traces


def ace_update(deltas: Tensor, weights: Sequence[float], params: Params) -> tuple[Tensor, bool]:
    """ACE's merged update of ``(T, m, n)`` task vectors, computed in float64, and its heterogeneity flag."""
    flag, traces = heterogeneous(deltas)
    tau = deltas.double()
    w = torch.tensor(list(weights), dtype=tau.dtype, device=tau.device)
    mean_w = w / w.sum()
    centred = tau - tau.mean(dim=1, keepdim=True)
    covs = centred.mT @ centred
    cov_traces = torch.diagonal(covs, dim1=1, dim2=2).sum(dim=1) + TINY
    eps = torch.full_like(cov_traces, params.eps)
    if flag:
        covs = covs / cov_traces.reshape(-1, 1, 1)
        eps = eps / cov_traces
    eye = torch.eye(tau.shape[2], dtype=tau.dtype, device=tau.device)
    ridged = covs + eps.reshape(-1, 1, 1) * eye
    # (1, n): broadcast onto every row of the system, as the authors add it
    prior = torch.einsum("t,tij->ij", w, covs).mean(dim=0, keepdim=True)
    if flag:
        prior = prior / (float(traces.double() @ mean_w) + TINY)
    lhs = torch.einsum("t,tij->ij", w, ridged) + prior
    rhs = torch.einsum("t,tmi,tij->mj", w, centred, ridged)
    try:
        update = rhs @ torch.linalg.inv(lhs)
    except torch.linalg.LinAlgError:
        update = rhs @ torch.linalg.pinv(lhs)
    if flag:
        spread = covs - torch.einsum("t,tij->ij", mean_w, ridged)
        refined = update + torch.einsum("t,tmi,tij->mj", w, tau, spread)
        u, s, vh = exact_svd(refined.float())
        k = int(s.numel() * params.k_frac)
        if k > 0:
            update = update + float(s[:k].double().mean()) * (u[:, :k].double() @ vh[:k].double())
    return update.to(deltas.dtype), flag


@method("ace", summary="ACE-Merging: RegMean's closed form with covariances estimated from the row-centred task "
                       "vectors, a collective prior and, for heterogeneous experts, trace normalisation and an "
                       "isotropic boost.",
        params=Params)
def ace(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
        params: Params, generator: torch.Generator | None = None) -> Merged:
    assert base is not None
    if base.dim() != 2:
        return Merged(add_weighted_deltas(base, (t - base for t in tensors), weights, params.scale, normalize=True))
    update, flag = ace_update(stacked_deltas(tensors, base), weights, params)
    return Merged(onto_base(update, base, params.scale), {"heterogeneous": flag})
