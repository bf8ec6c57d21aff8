"""Parameter fields several methods share, so one concept has one name, one range and one text.

Canonical names (docs/methods.md has the table): ``scale`` is the scale of the merged
update, ``W0 + scale * delta``; ``off_diagonal_scale`` scales the Gram matrices'
off-diagonal entries. Each field also accepts the spellings the methods used before
(``lambda``, mergekit's, and ``alpha``; RegMean's ``alpha``, PivotMerge's ``gram_alpha``:
CHANGELOG.md), so existing specs and mergekit configs still run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, Field

from pivotmerge.methods import PER_MODEL, Need, Search

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


# What each expert's weights are matched on when a layer is fitted on the merged model's inputs X~_k.
ExpertTarget = Annotated[Literal["merged_inputs", "own_inputs"], Search(choices=("merged_inputs", "own_inputs"))]


def expert_target_field() -> Any:
    return Field("merged_inputs", description=(
        "With gram_inputs: merged, the outputs the layer is fitted to: merged_inputs, each expert's weights on the "
        "merged model's inputs, W_k X~_k (RegMean++ as published); own_inputs, each expert's outputs on its own "
        "inputs, W_k X_k, through the cross Gram X_k^T X~_k (the layer also undoes what the merged layers below "
        "it changed). Ignored with gram_inputs: expert."))


def merged_input_needs(gram_inputs: str, expert_target: str) -> set[Need]:
    """What a Gram fit reads: the experts' own Grams, or on the merged model's inputs their Grams, with the cross
    Grams only when each expert's outputs on its own inputs are the target."""
    if gram_inputs != "merged":
        return {Need.GRAMS}
    cross = {Need.CROSS_GRAMS} if fits_own_outputs(gram_inputs, expert_target) else set()
    return {Need.GRAMS, Need.MERGED_INPUTS} | cross


def fits_own_outputs(gram_inputs: str, expert_target: str) -> bool:
    """Whether a layer fitted on the merged model's inputs matches each expert's outputs on its own inputs, so its
    merge reads the cross Grams ``X_k^T X~_k`` (else the Grams of the merged inputs alone)."""
    return gram_inputs == "merged" and expert_target == "own_inputs"
