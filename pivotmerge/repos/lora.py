"""LoRA adapters (PEFT folders) as merge inputs: the base with each adapted tensor's
delta ``scale * B @ A`` added when that tensor is read, never the whole model in memory.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``
(``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), and whole tensors
for ``modules_to_save`` (and an embedding's ``base_layer``), which replace the
base's. Module names are those of the model in memory; the family's naming
rules match them to the base's on-disk names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pivotmerge.errors import RepoError
from pivotmerge.repos.model_repo import ModelRepo, _read_header, _read_json, _weight_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$"
                      r"|^(?P<emodule>.+)\.(?P<epart>lora_embedding_A|lora_embedding_B)$")


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraDelta:
    """How one base tensor changes: ``scale * B @ A`` (transposed for embeddings and fan-in-fan-out layers)."""

    a: str
    b: str
    scale: float
    transpose: bool


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override (rank_pattern, alpha_pattern): a key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterRepo(ModelRepo):
    """A PEFT LoRA adapter read as the full model it makes of `base`."""

    base: ModelRepo = field(default=None, repr=False)  # type: ignore[assignment]
    weights: ModelRepo = field(default=None, repr=False)  # type: ignore[assignment]
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor -> adapter tensor holding its new value

    @classmethod
    def over(cls, ref: str, path: Path, base: ModelRepo, canonical: Callable[[str], str],
             allowed_roots: Sequence[Path] | None = None) -> "AdapterRepo":
        config = _read_json(path / ADAPTER_CONFIG, ref)
        if config.get("peft_type", "LORA") != "LORA":
            raise RepoError(f"{ref}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
        if config.get("use_dora"):
            raise RepoError(f"{ref}: a DoRA adapter; only plain LoRA adapters can be merged")
        weights = _open_weights(ref, path, allowed_roots)
        try:
            deltas, replaced = _plan_adapter(ref, config, weights, base, canonical)
        except RepoError:
            weights.close()
            raise
        return cls(ref=ref, path=path, config=base.config, tensors=base.tensors, base=base, weights=weights,
                   deltas=deltas, replaced=replaced)

    @property
    def kind(self) -> str:
        return "LoRA adapter"

    def get(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            tensor = self.weights.get(self.replaced[name]).to(self.tensors[name].dtype)
        else:
            tensor = self.base.get(name)
        d = self.deltas.get(name)
        if d is None:
            return tensor
        delta = self.weights.get(d.b).float() @ self.weights.get(d.a).float()
        if d.transpose:
            delta = delta.T
        return (tensor.float() + d.scale * delta).to(tensor.dtype)

    def close(self) -> None:
        self.weights.close()  # the base belongs to the plan


def _open_weights(ref: str, path: Path, allowed_roots: Sequence[Path] | None) -> ModelRepo:
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise RepoError(f"{ref}: no {ADAPTER_WEIGHTS} (a pickled adapter_model.bin is never read)")
    _weight_files(path, ref, allowed_roots)  # confined to the allowed roots, symbolic links included
    return ModelRepo(ref=ref, path=path, config={}, tensors=_read_header(path / ADAPTER_WEIGHTS, ADAPTER_WEIGHTS, ref))


def _plan_adapter(ref: str, config: dict[str, Any], weights: ModelRepo, base: ModelRepo,
                  canonical: Callable[[str], str]) -> tuple[dict[str, LoraDelta], dict[str, str]]:
    """Which base tensor each adapter tensor changes, checked against the base's names and shapes."""
    base_names = {canonical(n): n for n in base.tensors}

    def base_name(tensor: str) -> str:
        name = base_names.get(canonical(tensor))
        if name is None:
            raise RepoError(f"{ref}: adapter does not fit base {base.ref}: the base has no tensor {tensor} "
                            f"(an adapter for another model?)")
        return name

    pairs: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in weights.tensors:
        inner = key.removeprefix(PEFT_PREFIX)
        m = LORA_KEY.match(inner)
        if m is None:  # modules_to_save, an embedding's base_layer: whole tensors
            target = base_name(inner.replace(".base_layer.", "."))
            _same_shape(ref, base, target, weights.tensors[key].shape)
            replaced[target] = key
            continue
        module = m.group("module") or m.group("emodule")
        part = (m.group("part") or m.group("epart"))[-1]  # "A" or "B"
        pairs.setdefault(module, {})[part] = key
        pairs[module]["embedding"] = "yes" if m.group("epart") else ""
    deltas = {}
    for module, keys in pairs.items():
        if "A" not in keys or "B" not in keys:
            raise RepoError(f"{ref}: module {module} has lora_{'A' if 'A' not in keys else 'B'} missing")
        a_shape, b_shape = weights.tensors[keys["A"]].shape, weights.tensors[keys["B"]].shape
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise RepoError(f"{ref}: module {module} is not a linear or embedding LoRA (A is {list(a_shape)}); "
                            "not supported")
        rank = a_shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = bool(keys["embedding"]) or bool(config.get("fan_in_fan_out"))
        target = base_name(f"{module}.weight")
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        _same_shape(ref, base, target, shape)
        deltas[target] = LoraDelta(keys["A"], keys["B"], float(scale), transpose)
    return deltas, replaced


def _same_shape(ref: str, base: ModelRepo, target: str, shape: tuple[int, ...]) -> None:
    if tuple(shape) != base.tensors[target].shape:
        raise RepoError(f"{ref}: adapter does not fit base {base.ref}: {target} would be {list(shape)}, "
                        f"the base's is {list(base.tensors[target].shape)} (an adapter for another model?)")
