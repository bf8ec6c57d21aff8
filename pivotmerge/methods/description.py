"""The one description of a method, as `pivotmerge methods --json`, ``GET /v1/methods`` and a tuning
study's report give it: read from the method's registration (`Method`), never written twice."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from pivotmerge.methods import Method, Search


class SearchRange(BaseModel):
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @classmethod
    def of(cls, search: Search) -> SearchRange:
        return cls(low=search.low, high=search.high, log=search.log,
                   choices=None if search.choices is None else list(search.choices))


class ParameterDescription(BaseModel):
    name: str
    description: str | None = None
    default: Any = Field(None, description="The value used when the spec does not set it.")
    per_model: bool = Field(False, description="Each model may set its own value under models[].parameters.")
    json_schema: dict[str, Any] = Field(..., description="The parameter's JSON schema (type, enum, bounds).")
    search: SearchRange | None = Field(None, description="Where tuning searches it; absent when it is not tuned.")


class MethodDescription(BaseModel):
    name: str
    summary: str
    base_model: Literal["required", "optional", "unused"] = Field(
        ..., description="Whether the method needs base_model, uses it when given, or ignores it.")
    min_models: int
    max_models: int | None = None
    calibration_data: list[str] = Field(
        default_factory=list, description="What the method can measure on the spec's calibration dataset.")
    defaults_with_calibration: dict[str, Any] = Field(
        default_factory=dict, description="Defaults that replace the parameters' own when the spec gives calibration "
                                          "data (values the spec sets win).")
    parameters: list[ParameterDescription]


# Keys of a property's JSON schema that the description gives apart (or, the title, not at all).
_NOT_SCHEMA = ("title", "description", "default")


def describe(method: Method) -> MethodDescription:
    """`method` as one JSON-able description: the parameters a spec may set (the params model's
    JSON schema less what the engine fills from calibration data), with their markers."""
    properties = method.params.model_json_schema().get("properties", {})
    searched = method.search_space
    parameters = [
        ParameterDescription(name=name, description=prop.get("description"), default=prop.get("default"),
                             per_model=name in method.per_model,
                             search=None if name not in searched else SearchRange.of(searched[name]),
                             json_schema={k: v for k, v in prop.items() if k not in _NOT_SCHEMA})
        for name, prop in properties.items() if name not in method.engine_params
    ]
    return MethodDescription(name=method.name, summary=method.summary, base_model=method.base,
                             min_models=method.min_models, max_models=method.max_models,
                             calibration_data=list(method.engine_params),
                             defaults_with_calibration=dict(method.with_calibration), parameters=parameters)
