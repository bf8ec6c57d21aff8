"""Where a tensor sits in a model: its component and its layer.

One small table per architecture family, chosen by config.json's `model_type`,
with a generic fallback for families not listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from pivotmerge.spec.schema import Component


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    components: tuple[tuple[Component, re.Pattern[str]], ...]  # first match wins
    layer: re.Pattern[str]  # group 1 is the layer index

    def component(self, tensor: str) -> Component:
        for component, pattern in self.components:
            if pattern.search(tensor):
                return component
        return Component.language_model

    def layer_index(self, tensor: str) -> int | None:
        m = self.layer.search(tensor)
        return int(next(g for g in m.groups() if g is not None)) if m else None


def _c(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# The projector's linear_1/linear_2 are its layers 1 and 2.
LLAVA = Architecture(
    name="llava",
    model_types=("llava", "llava_next", "llava_onevision", "vipllava"),
    components=(
        (Component.projector, _c(r"(^|\.)multi_modal_projector\.")),
        (Component.vision_tower, _c(r"(^|\.)vision_tower\.")),
        (Component.language_model, _c(r"(^|\.)(language_model|lm_head)\.|^lm_head\.")),
    ),
    layer=_c(r"\.layers\.(\d+)\.|\.linear_(\d+)\."),
)

GENERIC = Architecture(
    name="generic",
    model_types=(),
    components=(
        (Component.projector, _c(r"(^|\.)(multi_modal_projector|mm_projector|projector|merger)\.")),
        (Component.vision_tower, _c(r"(^|\.)(vision_tower|vision_model|visual|vision)\.")),
    ),
    layer=_c(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\."),
)

FAMILIES = (LLAVA,)


def architecture_for(model_type: str | None) -> Architecture:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


@dataclass(frozen=True)
class TensorPlace:
    component: Component
    layer: int | None
    depth: float  # position in [0, 1] within the component, for depth-interpolated parameters


def place_tensors(arch: Architecture, names: Iterable[str]) -> dict[str, TensorPlace]:
    """Component, layer index and depth of every tensor.

    Depth runs from 0 at a component's first layer to 1 at its last; tensors
    outside any layer sit at 0 when they are embeddings and at 1 otherwise
    (final norms, heads), as mergekit's gradients do.
    """
    names = list(names)
    raw = {n: (arch.component(n), arch.layer_index(n)) for n in names}
    first: dict[Component, int] = {}
    last: dict[Component, int] = {}
    for component, layer in raw.values():
        if layer is not None:
            first[component] = min(first.get(component, layer), layer)
            last[component] = max(last.get(component, layer), layer)
    places = {}
    for n, (component, layer) in raw.items():
        if layer is None:
            depth = 0.0 if "embed" in n else 1.0
        else:
            span = last[component] - first[component]
            depth = (layer - first[component]) / span if span else 0.0
        places[n] = TensorPlace(component, layer, depth)
    return places

