"""Spherical linear interpolation between exactly two models."""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch
from pydantic import Field

from pivotmerge.methods import MethodParams, Search, Tensor, method

_EPS = 1e-8


class Params(MethodParams):
    t: Annotated[float, Search(0.0, 1.0)] = Field(
        0.5, description="Interpolation position: 0 gives the first model, 1 the second.")
    dot_threshold: float = Field(
        0.9995, gt=0, le=1,
        description="Above this |cosine| between the two tensors, interpolate linearly (mergekit's value).")


@method("slerp", summary="Spherical interpolation of two models along the great circle through them "
                          "(whole tensor as one vector).",
        params=Params, base="unused", min_models=2, max_models=2)
def slerp(tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
          params: Params, generator: torch.Generator | None = None) -> Tensor:
    v0, v1 = tensors
    t = params.t
    n0, n1 = float(v0.norm()), float(v1.norm())
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (max(n0, _EPS) * max(n1, _EPS))
    # Nearly (anti-)colinear tensors make sin(theta) vanish; lerp is then exact enough.
    if abs(dot) > params.dot_threshold:
        return torch.lerp(v0, v1, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return v0 * s0 + v1 * s1
