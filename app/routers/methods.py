"""/v1/methods: the merge methods and their parameters, read from the engine's registry.

Parameters are read from each method's pydantic `params` model's JSON schema, so a
method describes its parameters once, where it is defined, and this listing follows.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from pivotmerge.methods import Method, Search, all_methods

from app.deps import TeamDep
from app.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=ERROR_RESPONSES)


class SearchOut(BaseModel):
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


def search_out(search: Search | None) -> SearchOut | None:
    return None if search is None else SearchOut(**asdict(search))


class ParameterOut(BaseModel):
    name: str
    description: str | None = None
    default: Any = Field(None, description="The value used when the spec does not set it.")
    per_model: bool = Field(False, description="Each model may set its own value under models[].parameters.")
    json_schema: dict[str, Any] = Field(..., description="The parameter's JSON schema (type, enum, bounds).")
    search: SearchOut | None = Field(None, description="Where tuning searches it; absent when it is not tuned.")


class MethodOut(BaseModel):
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
    parameters: list[ParameterOut]


class MethodList(BaseModel):
    methods: list[MethodOut]


def parameters_of(method: Method) -> list[ParameterOut]:
    """The parameters a spec may set: the params model's properties less those the engine fills."""
    schema = method.params.model_json_schema()
    hidden = set(method.engine_params)
    searched = method.search_space
    return [
        ParameterOut(name=name, description=prop.get("description"), default=prop.get("default"),
                     per_model=name in method.per_model, search=search_out(searched.get(name)),
                     json_schema={k: v for k, v in prop.items() if k not in ("title", "description", "default")})
        for name, prop in schema.get("properties", {}).items() if name not in hidden
    ]


def method_out(method: Method) -> MethodOut:
    return MethodOut(name=method.name, summary=method.summary, base_model=method.base, min_models=method.min_models,
                     max_models=method.max_models, calibration_data=[need.value for need in method.data],
                     defaults_with_calibration=dict(method.with_calibration),
                     parameters=parameters_of(method))


@router.get("", operation_id="list_methods", summary="Merge methods and their parameters")
def list_methods(team: TeamDep) -> MethodList:
    return MethodList(methods=[method_out(m) for m in all_methods().values()])
