"""Parameter pieces shared by several methods' ``Params``."""

from __future__ import annotations

from typing import Union

from pydantic import Field, create_model

from pivotmerge.methods import MethodParams

# A per-model value: one float for all experts, or one per expert.
PerModel = Union[float, list[float]]

# ``lambda`` is a Python keyword, so a class body cannot declare it; the spec
# (and mergekit) call the final scale ``lambda``, so the field keeps that name.
LambdaParams = create_model(
    "LambdaParams",
    __base__=MethodParams,
    **{"lambda": (float, Field(1.0, description="Scale of the merged delta: W0 + lambda * delta."))},
)


def scale(params: MethodParams) -> float:
    """The ``lambda`` of a ``LambdaParams``."""
    return float(getattr(params, "lambda"))
