"""The merge-method registry.

A method is a pure function of tensors and parameters:

    merge(tensors, base, weights, params, generator) -> Tensor | Merged

* ``tensors``: the experts' versions of one tensor (same shape, float32, same device).
* ``base``: the pivot / shared starting point, or ``None`` when the spec has none.
* ``weights``: one float per expert (the spec's ``models[].weight``).
* ``params``: the method's own pydantic ``Params``, resolved for this tensor
  (per-layer gradients and name filters already applied; per-model values such as
  ``density`` arrive as a list with one entry per expert).
* ``generator``: a ``torch.Generator`` seeded for this tensor, for random methods.

It returns the merged tensor, or ``Merged(tensor, info)`` when it has choices worth
recording in the merge report (ranks kept, directions suppressed, layer scales).
I/O, devices and scheduling never enter method code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict

Tensor = torch.Tensor


class MethodParams(BaseModel):
    """Base class of every method's parameters; unknown names are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Merged:
    tensor: Tensor
    info: dict[str, Any] = field(default_factory=dict)


MethodResult = Union[Tensor, Merged]
MergeFn = Callable[[Sequence[Tensor], "Tensor | None", Sequence[float], Any, "torch.Generator | None"], MethodResult]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    params: type[MethodParams]
    merge: MergeFn
    # "required": needs base_model; "optional": uses it when given; "unused": ignores it.
    base: str = "required"
    min_models: int = 1
    max_models: int | None = None
    # Parameters that each model may set for itself under models[].parameters.
    per_model: tuple[str, ...] = ()
    # Parameters the engine fills from calibration data (RegMean's Gram matrices, PivotMerge's
    # alignment scores): a spec that sets them is rejected up front instead of failing mid-merge.
    engine_params: tuple[str, ...] = ()
    # True when each output element depends only on the inputs' same element (and the
    # parameters): the engine may then merge a large tensor in cache-sized pieces.
    elementwise: bool = False

    def __call__(self, tensors: Sequence[Tensor], base: Tensor | None, weights: Sequence[float],
                 params: MethodParams, generator: torch.Generator | None = None) -> Merged:
        out = self.merge(tensors, base, weights, params, generator)
        return out if isinstance(out, Merged) else Merged(out)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def all_methods() -> dict[str, Method]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


_BUILTIN = ("linear", "task_arithmetic", "ties", "dare", "slerp", "tsv", "iso", "pivotmerge", "regmean")


def _load_builtin() -> None:
    import importlib

    for module in _BUILTIN:
        importlib.import_module(f"{__name__}.{module}")


def per_model(value: float | Sequence[float], k: int, name: str) -> list[float]:
    """A per-model parameter as one float per expert (a scalar applies to all)."""
    if isinstance(value, (int, float)):
        return [float(value)] * k
    values = [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{name}: expected {k} values (one per model), got {len(values)}")
    return values
