"""Parameter fields several methods share, so one concept has one name, one range and one text.

Canonical names (docs/methods.md has the table): ``scale`` is the scale of the merged
update, ``W0 + scale * delta``; ``off_diagonal_scale`` scales the Gram matrices'
off-diagonal entries. Each field also accepts the spellings the methods used before
(``lambda``, mergekit's, and ``alpha``; RegMean's ``alpha``, PivotMerge's ``gram_alpha``:
CHANGELOG.md), so existing specs and mergekit configs still run.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import AliasChoices, Field

from pivotmerge.methods import PER_MODEL, Search

# Searched on a log range: the best scale differs by up to 8x between methods (docs/results.md).
Scale = Annotated[float, Search(0.05, 2.0, log=True)]
OffDiagonalScale = Annotated[float, Search(0.5, 1.0)]
# A density: one value for all experts, or one per expert.
Density = Annotated[Union[float, list[float]], PER_MODEL, Search(0.1, 1.0)]


def scale_field(*old_names: str, default: float = 1.0,
                description: str = "Scale of the merged update: W0 + scale * delta.") -> Any:
    return Field(default, validation_alias=AliasChoices("scale", *old_names), description=description)


def off_diagonal_scale_field(*old_names: str) -> Any:
    return Field(0.9, ge=0, le=1, validation_alias=AliasChoices("off_diagonal_scale", *old_names),
                 description="Scale of the Gram matrices' off-diagonal entries (1: plain RegMean; 0: diagonal only).")
