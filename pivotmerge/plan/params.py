"""Resolve a spec's parameter values for one tensor.

See pivotmerge.spec for the three forms a value takes (scalar, depth list,
name-filtered entries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from pivotmerge.errors import SpecError
from pivotmerge.methods import Method, MethodParams
from pivotmerge.spec.schema import FilteredValue, MergeSpec, ParamValue, format_validation_error


def interpolate(values: Sequence[float], depth: float) -> float:
    """Piecewise-linear value at `depth` in [0, 1], values spread evenly over depth."""
    if len(values) == 1:
        return float(values[0])
    pos = min(max(depth, 0.0), 1.0) * (len(values) - 1)
    lo = min(int(pos), len(values) - 2)
    frac = pos - lo
    return float(values[lo]) * (1 - frac) + float(values[lo + 1]) * frac


def resolve_value(value: ParamValue, tensor: str, depth: float) -> Any:
    """The scalar a parameter value takes for one tensor; None if no filter matches."""
    if isinstance(value, list) and value and isinstance(value[0], FilteredValue):
        for entry in value:
            if entry.filter is None or re.search(entry.filter, tensor):
                return resolve_value(entry.value, tensor, depth)
        return None
    if isinstance(value, list):
        return interpolate(value, depth)
    return value


@dataclass(frozen=True)
class TensorParams:
    """What the method gets for one merged tensor from the spec: each model's weight and the method's
    parameters resolved for this tensor (calibration data comes from the calibration stage)."""

    weights: list[float]
    params: MethodParams


def resolve_params(spec: MergeSpec, method: Method, tensor: str, depth: float) -> TensorParams:
    """Per-model weights and the method's parameters for one tensor.

    Per-model parameters become one value per model: the model's own, else the
    spec-wide value, else the method's default. A parameter the spec leaves unset for
    this tensor takes the method's default: where the spec gives calibration data, the
    method's `with_calibration` value if it has one. Names stay as the spec spells them
    (old spellings included), so a validation error names what the user wrote.
    """
    global_values = {k: resolve_value(v, tensor, depth) for k, v in spec.parameters.items()}
    global_values = {k: v for k, v in global_values.items() if v is not None}
    weights = []
    for entry in spec.models:
        w = resolve_value(entry.weight, tensor, depth)
        weights.append(1.0 if w is None else float(w))
    values: dict[str, Any] = dict(global_values)
    canonical = method.aliases()
    with_calibration = method.with_calibration if spec.gives_calibration else {}
    given = {canonical[k] for k in global_values}
    values.update({k: v for k, v in with_calibration.items() if k not in given and k not in method.per_model})
    for name in method.per_model:
        spelled = {k: v for k, v in global_values.items() if canonical[k] == name}
        key, default = next(iter(spelled.items()), (name, with_calibration.get(name, method.params.model_fields[name].default)))
        per = []
        for entry in spec.models:
            own = next((resolve_value(v, tensor, depth) for k, v in entry.parameters.items() if canonical[k] == name), None)
            per.append(default if own is None else own)
        values[key] = per
    return TensorParams(weights, method.params.model_validate(values))


def resolve_all(spec: MergeSpec, method: Method, depths: Mapping[str, float]) -> dict[str, TensorParams]:
    """The parameters of every merged tensor (name -> depth), resolved once, before any tensor is read.

    A value can differ per tensor (depth lists, filters), so each tensor's resolved
    set is checked; the error names the parameter and the first tensor it fails for.
    """
    out = {}
    for tensor, depth in depths.items():
        try:
            out[tensor] = resolve_params(spec, method, tensor, depth)
        except ValidationError as exc:
            raise SpecError(f"parameters.{format_validation_error(exc)} (for tensor {tensor})") from None
    return out
