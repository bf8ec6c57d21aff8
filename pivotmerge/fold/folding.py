"""Expert folding (Sung et al., 2023): merge the modality-specific parameter groups
of ONE model into a single modality-agnostic group.

Name maps say which tensors fold together: each modality has a regular
expression and its replacement, and tensors whose rewritten names agree are
one folded tensor. With ``vision: {pattern: '\\.mlp\\.vision\\.', replace: '.mlp.'}``
and ``text: {pattern: '\\.mlp\\.text\\.', replace: '.mlp.'}``, the tensors
``layers.0.mlp.vision.fc.weight`` and ``layers.0.mlp.text.fc.weight`` fold into
``layers.0.mlp.fc.weight``. Methods, for the modalities' tensors ``W_m``:

* ``interpolation``: ``sum_m w_m W_m / sum_m w_m``;
* ``modality_arithmetic``: ``W0 + scale * sum_m (W_m - W0)``, each delta against
  the untouched shared weight ``W0`` (the folded name in `w0`, e.g. the
  pre-trained model the experts were split from);
* ``regmean``: RegMean over the modalities with the Gram matrices of each
  modality's inputs (keyed by source tensor name); tensors without one
  (biases) interpolate.

A modality whose map says ``required: false`` (the ``vl`` expert of the top blocks only)
joins the folded tensors it has a tensor for; a folded tensor needs every required
modality and at least two in all. Weights are normalised over the modalities present, so
Sung et al.'s interpolation (``2a/3, 2(1-a)/3, 1/3`` for ``v, l, vl`` in the top blocks,
``a, 1-a`` below) is ``weights: {v: 2a, l: 2(1-a), vl: 1}``.

Tensors no map matches are kept as they are.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Mapping, TypeVar

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from pivotmerge.errors import CompatibilityError, SpecError
from pivotmerge.methods.toolkit.deltas import add_weighted_deltas
from pivotmerge.methods.regmean import regmean_solve

Tensor = torch.Tensor
SpecT = TypeVar("SpecT", bound="FoldSpec")


class NameMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(..., description="Regular expression searched in tensor names of this modality's group.")
    replace: str = Field(..., description="Replacement (re.sub syntax) giving the folded tensor's name.")
    required: bool = Field(
        True, description="Whether every folded tensor needs this modality (false: only where it has one).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {v!r}: {exc}") from None
        return v


class FoldSpec(BaseModel):
    """How to fold one model's modality-specific groups into one."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["interpolation", "modality_arithmetic", "regmean"]
    groups: dict[str, NameMap] | None = Field(
        None, description="Modality name -> name map; default: the model family's own table (pivotmerge.fold.tables).")
    weights: dict[str, float] = Field(
        default_factory=dict, description="Interpolation/RegMean weight per modality; default 1.")
    # The methods' names for the same concepts (docs/methods.md); the old spellings stay accepted.
    scale: float = Field(1.0, validation_alias=AliasChoices("scale", "lambda"),
                         description="modality_arithmetic: scale of the summed deltas.")
    off_diagonal_scale: float = Field(0.9, ge=0, le=1, validation_alias=AliasChoices("off_diagonal_scale", "alpha"),
                                      description="regmean: scale of the Gram matrices' off-diagonal entries.")

    @model_validator(mode="after")
    def _known_modalities(self) -> "FoldSpec":
        if self.groups is None:
            return self
        if len(self.groups) < 2:
            raise ValueError("groups: folding needs at least two modalities")
        unknown = set(self.weights) - set(self.groups)
        if unknown:
            raise ValueError(f"weights: {sorted(unknown)[0]!r} is not a modality in groups")
        return self

    def weight(self, modality: str) -> float:
        return float(self.weights.get(modality, 1.0))

    def with_groups(self: SpecT, groups: Mapping[str, Any]) -> SpecT:
        """This spec with `groups` filled in (a family's table), validated again."""
        return self.model_validate({**self.model_dump(), "groups": groups})

    @property
    def name_maps(self) -> dict[str, NameMap]:
        if self.groups is None:
            raise SpecError("groups: this model has no folding table; give a name map per modality")
        return self.groups


def fold_plan(names: list[str], spec: FoldSpec) -> dict[str, dict[str, str]]:
    """Folded name -> {modality: source tensor name}; every folded name needs every modality."""
    plan: dict[str, dict[str, str]] = {}
    groups = spec.name_maps
    for name in names:
        for modality, m in groups.items():
            if re.search(m.pattern, name):
                target = re.sub(m.pattern, m.replace, name)
                sources = plan.setdefault(target, {})
                if modality in sources:
                    raise SpecError(f"groups.{modality}: {sources[modality]} and {name} both map to {target}")
                sources[modality] = name
                break
    if not plan:
        raise SpecError("groups: no tensor name matches any pattern")
    for target, sources in plan.items():
        have = next(iter(sources.values()))
        missing = [m for m, name_map in groups.items() if name_map.required and m not in sources]
        if missing:
            raise CompatibilityError(f"{have} folds into {target}, but modality {missing[0]!r} has no tensor for it")
        if len(sources) < 2:
            raise CompatibilityError(f"{have} folds into {target} alone: no other modality has a tensor for it")
    return plan


def fold_tensor(sources: Mapping[str, Tensor], spec: FoldSpec, w0: Tensor | None = None,
                grams: Mapping[str, Tensor] | None = None) -> Tensor:
    """One folded tensor from its modalities' tensors (keyed by modality; optional ones may be absent)."""
    modalities = [m for m in spec.name_maps if m in sources]
    ws = [sources[m].to(torch.float32) for m in modalities]
    scales = [spec.weight(m) for m in modalities]
    if spec.method == "modality_arithmetic":
        if w0 is None:
            raise CompatibilityError("modality_arithmetic needs the untouched shared weight W0 for every folded tensor")
        w0 = w0.to(torch.float32)
        return add_weighted_deltas(w0, (w - w0 for w in ws), [1.0] * len(ws), spec.scale)
    if spec.method == "regmean" and grams is not None and ws[0].ndim == 2:
        return regmean_solve(ws, [grams[m] for m in modalities], scales, spec.off_diagonal_scale)
    return sum(s * w for s, w in zip(scales, ws)) / sum(scales)


def fold_state(state: Mapping[str, Tensor], spec: FoldSpec, *, w0: Mapping[str, Tensor] | None = None,
               grams: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's tensors with each group folded, and a report of what folded into what.

    `w0` holds the untouched shared weights under the folded names (default: the
    model's own tensors of those names, if it kept them); `grams` the Gram
    matrices of the source tensors' inputs, under the source names.
    """
    plan = fold_plan(list(state), spec)
    sources_all = {s for sources in plan.values() for s in sources.values()}
    out = {n: t for n, t in state.items() if n not in sources_all and n not in plan}
    for target, sources in plan.items():
        dtype = state[next(iter(sources.values()))].dtype
        tensor_grams = None
        if grams is not None and all(s in grams for s in sources.values()):
            tensor_grams = {m: grams[s] for m, s in sources.items()}
        base = (state if w0 is None else w0).get(target)
        out[target] = fold_tensor({m: state[s] for m, s in sources.items()}, spec, base, tensor_grams).to(dtype)
    report = {"method": spec.method, "folded": {t: dict(s) for t, s in plan.items()}}
    return out, report
