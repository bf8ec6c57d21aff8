"""/v1/methods: the merge methods and their parameters, as the engine describes them
(`pivotmerge.methods.description.describe`, also `pivotmerge methods --json`).

The response models are the engine's description under the names this API has always
published, so the OpenAPI document keeps them; only the nested types are renamed.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from pivotmerge.methods import all_methods
from pivotmerge.methods.description import MethodDescription, ParameterDescription, SearchRange, describe

from app.deps import TeamDep
from app.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/methods", tags=["methods"], responses=ERROR_RESPONSES)


class SearchOut(SearchRange):
    pass


class ParameterOut(ParameterDescription):
    search: SearchOut | None = ParameterDescription.model_fields["search"]


class MethodOut(MethodDescription):
    parameters: list[ParameterOut]


class MethodList(BaseModel):
    methods: list[MethodOut]


@router.get("", operation_id="list_methods", summary="Merge methods and their parameters")
def list_methods(team: TeamDep) -> MethodList:
    return MethodList.model_validate({"methods": [describe(m).model_dump() for m in all_methods().values()]})
