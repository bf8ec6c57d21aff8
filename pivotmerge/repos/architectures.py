"""Where a tensor sits in a model: its component and its layer.

One declared table per architecture family, chosen by config.json's
`model_type`, with a generic fallback for families not listed. Tables are
written against the names transformers uses in memory today
(``model.language_model.*``, ``model.multi_modal_projector.*``); names in the
older on-disk layout (``language_model.model.*``, ``multi_modal_projector.*``,
Qwen2-VL's ``model.layers.*`` and ``visual.*``), which transformers still reads
and `save_pretrained` still writes, are first rewritten by the family's
`legacy` prefixes, so both styles land in the same places.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from pivotmerge.spec.schema import Component


def _c(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    # (component, pattern on the current-style name); first match wins; a name no rule matches is unclaimed
    components: tuple[tuple[Component, re.Pattern[str]], ...]
    layer: re.Pattern[str]  # layer index of the towers' tensors: the first non-empty group
    projector_layer: re.Pattern[str] | None = None  # the projector's own layers (linear_1, mlp.0, ...)
    # (legacy on-disk prefix, current prefix), first match wins
    legacy: tuple[tuple[re.Pattern[str], str], ...] = ()
    # where a text-only causal LM's `model.` tensors sit in this family (item: LLM into a VLM)
    text_prefix: str = "model.language_model."

    def canonical(self, tensor: str) -> str:
        """`tensor` in the current naming style."""
        for legacy, current in self.legacy:
            if legacy.match(tensor):
                return legacy.sub(current, tensor, count=1)
        return tensor

    def component(self, tensor: str) -> Component | None:
        name = self.canonical(tensor)
        for component, pattern in self.components:
            if pattern.search(name):
                return component
        return None

    def layer_index(self, tensor: str) -> int | None:
        name = self.canonical(tensor)
        pattern = self.projector_layer if self.component(tensor) is Component.projector else self.layer
        m = pattern.search(name) if pattern is not None else None
        return int(next(g for g in m.groups() if g is not None)) if m else None


# The on-disk layout most families were released in, and that `save_pretrained` writes.
COMMON_LEGACY = tuple((_c("^" + re.escape(old)), new) for old, new in (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_tower.", "model.vision_tower."),
    ("vision_model.", "model.vision_model."),
    ("image_newline", "model.image_newline"),
))
TOWER_LAYERS = _c(r"\.(?:layers|layer|blocks)\.(\d+)\.")
LM = (Component.language_model, _c(r"^(model\.language_model\.|lm_head\.)"))


def _multi_modal_projector(name: str, model_types: tuple[str, ...], vision: str = "vision_tower",
                           projector_layer: str | None = r"\.linear_(\d+)\.") -> Architecture:
    """Families laid out as LLaVA: model.{vision_tower|vision_model}, model.multi_modal_projector,
    model.language_model."""
    return Architecture(
        name=name, model_types=model_types,
        components=(
            # LLaVA-Next's image_newline is learned with the projector and appended to its output.
            (Component.projector, _c(r"^model\.(multi_modal_projector\.|image_newline$)")),
            (Component.vision_tower, _c(rf"^model\.{vision}\.")),
            LM,
        ),
        layer=TOWER_LAYERS,
        projector_layer=_c(projector_layer) if projector_layer else None,
        legacy=COMMON_LEGACY,
    )


LLAVA = _multi_modal_projector("llava", ("llava", "llava_next", "llava_onevision", "vipllava"))
INTERNVL = _multi_modal_projector("internvl", ("internvl",))
MISTRAL3 = _multi_modal_projector("mistral3", ("mistral3",))
AYA_VISION = _multi_modal_projector("aya_vision", ("aya_vision",))
GEMMA3 = _multi_modal_projector("gemma3", ("gemma3",), projector_layer=None)  # one projection matrix and a norm
PALIGEMMA = _multi_modal_projector("paligemma", ("paligemma",), projector_layer=None)  # one linear layer
# Mllama's vision model has a local and a global transformer; each numbers its layers from 0.
MLLAMA = _multi_modal_projector("mllama", ("mllama",), vision="vision_model", projector_layer=None)

QWEN2_VL = Architecture(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    components=(
        # the merger (and Qwen3-VL's deepstack mergers) project vision features into the LM
        (Component.projector, _c(r"^model\.visual\.(merger|deepstack_merger_list)\.")),
        (Component.vision_tower, _c(r"^model\.visual\.")),
        LM,
    ),
    layer=TOWER_LAYERS,
    projector_layer=_c(r"\.deepstack_merger_list\.(\d+)\.|\.mlp\.(\d+)\.|\.linear_fc(\d+)\."),
    legacy=(
        (_c(r"^visual\."), "model.visual."),
        (_c(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
    ),
)

IDEFICS3 = Architecture(
    name="idefics3",
    model_types=("idefics3", "smolvlm"),
    components=(
        (Component.projector, _c(r"^model\.connector\.")),
        (Component.vision_tower, _c(r"^model\.vision_model\.")),
        (Component.language_model, _c(r"^(model\.text_model\.|lm_head\.)")),
    ),
    layer=TOWER_LAYERS,
    text_prefix="model.text_model.",
)

# Text-only causal LMs (Llama, Qwen2, Mistral, Gemma, ...): everything is language model.
TEXT_LM = Architecture(
    name="text_lm",
    model_types=("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "cohere", "cohere2"),
    components=((Component.language_model, _c(r"^(model\.|lm_head\.)")),),
    layer=TOWER_LAYERS,
    text_prefix="model.",
)

# Unknown families: projector and vision tower by common names; everything else is language model.
GENERIC = Architecture(
    name="generic",
    model_types=(),
    components=(
        (Component.projector, _c(r"(^|\.)(multi_modal_projector|mm_projector|projector|merger|connector)\.")),
        (Component.vision_tower, _c(r"(^|\.)(vision_tower|vision_model|visual|vision)\.")),
        (Component.language_model, _c(r"")),
    ),
    layer=_c(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\."),
    legacy=COMMON_LEGACY,
)

FAMILIES = (LLAVA, QWEN2_VL, INTERNVL, GEMMA3, PALIGEMMA, IDEFICS3, MISTRAL3, MLLAMA, AYA_VISION, TEXT_LM)


def architecture_for(model_type: str | None) -> Architecture:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


@dataclass(frozen=True)
class TensorPlace:
    component: Component | None  # None: no rule of the family claims the tensor (never merged by component)
    layer: int | None
    depth: float  # position in [0, 1] within the component, for depth-interpolated parameters

    @property
    def component_name(self) -> str:
        return self.component.value if self.component is not None else "unclaimed"


def place_tensors(arch: Architecture, names: Iterable[str]) -> dict[str, TensorPlace]:
    """Component, layer index and depth of every tensor.

    Depth runs from 0 at a component's first layer to 1 at its last; tensors
    outside any layer sit at 0 when they are embeddings and at 1 otherwise
    (final norms, heads), as mergekit's gradients do.
    """
    names = list(names)
    raw = {n: (arch.component(n), arch.layer_index(n)) for n in names}
    first: dict[Component | None, int] = {}
    last: dict[Component | None, int] = {}
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
