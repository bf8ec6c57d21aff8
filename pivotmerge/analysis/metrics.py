"""Weight-distance metrics between models to be merged (Sung et al., EMNLP Findings 2023).

Every metric compares two tensors ``x`` and ``y``: the task vectors ``W - W0`` when
a base is given, else the weights themselves (docs/metrics.md has the formulas).
``pairwise`` averages them over all pairs of two or more models; ``aggregate``
turns per-tensor values into per-layer and total values for ``pivotmerge analyze``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from pivotmerge.methods.toolkit.sparsify import magnitude_trim_

Tensor = torch.Tensor
_TINY = 1e-12

# Share of largest-magnitude entries the truncated metric keeps (our choice, see docs).
DEFAULT_KEEP = 0.2


def l2_distance(x: Tensor, y: Tensor) -> float:
    """``||x - y||_2``."""
    return float(torch.linalg.vector_norm((x - y).double()))


def relative_l2_distance(x: Tensor, y: Tensor) -> float:
    """``||x - y|| / ((||x|| + ||y||) / 2)``, in [0, 2]; 0 when both are zero."""
    scale = (float(torch.linalg.vector_norm(x.double())) + float(torch.linalg.vector_norm(y.double()))) / 2
    return l2_distance(x, y) / scale if scale > _TINY else 0.0


def cosine_similarity(x: Tensor, y: Tensor) -> float:
    """``<x, y> / (||x|| ||y||)``; 0 when either is zero."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > _TINY else 0.0


def sign_dissimilarity(x: Tensor, y: Tensor) -> float:
    """Fraction of entries, among those where ``x`` or ``y`` is nonzero, whose signs differ."""
    active = (x != 0) | (y != 0)
    n = int(active.sum())
    return float(((x.sign() != y.sign()) & active).sum()) / n if n else 0.0


def soft_sign_dissimilarity(x: Tensor, y: Tensor) -> float:
    """Mean of ``1 - |x_i + y_i| / (|x_i| + |y_i|)`` over entries where either is nonzero.

    0 for equal signs, 1 for opposite signs of equal size; a small entry opposing a
    large one counts little.
    """
    x, y = x.double(), y.double()
    mass = x.abs() + y.abs()
    active = mass > 0
    n = int(active.sum())
    if not n:
        return 0.0
    return float((1 - (x + y).abs()[active] / mass[active]).sum()) / n


def truncated_sign_dissimilarity(x: Tensor, y: Tensor, keep: float = DEFAULT_KEEP) -> float:
    """Soft sign dissimilarity after keeping each tensor's top ``keep`` fraction by magnitude.

    Small entries flip sign freely without hurting a merge; truncating them first
    measures conflict where it matters (as TIES trims before electing signs).
    """
    return soft_sign_dissimilarity(magnitude_trim_(x.clone(), keep), magnitude_trim_(y.clone(), keep))


def pair_metrics(a: Tensor, b: Tensor, base: Tensor | None = None, keep: float = DEFAULT_KEEP) -> dict[str, float]:
    """Every metric for one pair, on task vectors when ``base`` is given."""
    x, y = (a, b) if base is None else (a - base, b - base)
    x, y = x.float(), y.float()
    return {
        "l2": l2_distance(x, y),
        "relative_l2": relative_l2_distance(x, y),
        "cosine": cosine_similarity(x, y),
        "sign_dissimilarity": sign_dissimilarity(x, y),
        "soft_sign_dissimilarity": soft_sign_dissimilarity(x, y),
        "truncated_sign_dissimilarity": truncated_sign_dissimilarity(x, y, keep),
    }


def pairwise(tensors: Sequence[Tensor], base: Tensor | None = None, keep: float = DEFAULT_KEEP) -> dict[str, float]:
    """Every metric averaged over all pairs ``i < j`` of two or more models' versions of a tensor."""
    if len(tensors) < 2:
        raise ValueError("distance metrics need at least two models")
    pairs = [pair_metrics(a, b, base, keep) for a, b in itertools.combinations(tensors, 2)]
    return {name: sum(p[name] for p in pairs) / len(pairs) for name in pairs[0]}


@dataclass(frozen=True)
class TensorMetrics:
    """Metrics of one tensor, with the layer it belongs to and its size."""

    name: str
    layer: str
    numel: int
    values: dict[str, float] = field(default_factory=dict)


def _weighted_mean(records: Sequence[TensorMetrics]) -> dict[str, float]:
    total = sum(r.numel for r in records)
    names = records[0].values.keys()
    return {n: sum(r.values[n] * r.numel for r in records) / total if total else 0.0 for n in names}


def aggregate(records: Iterable[TensorMetrics]) -> dict[str, dict]:
    """Per-layer and total values: numel-weighted means of the per-tensor values.

    Returns ``{"layers": {layer: {metric: value}}, "total": {metric: value}}``,
    layers in first-seen order.
    """
    records = list(records)
    if not records:
        return {"layers": {}, "total": {}}
    by_layer: dict[str, list[TensorMetrics]] = {}
    for r in records:
        by_layer.setdefault(r.layer, []).append(r)
    return {"layers": {layer: _weighted_mean(rs) for layer, rs in by_layer.items()},
            "total": _weighted_mean(records)}
