"""What a spec's `model:` may point at: a model folder (or hub id), a LoRA adapter over the
base, or a text-only causal LM whose weights join the base VLM's language model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from pivotmerge.errors import RepoError
from pivotmerge.repos.architectures import TEXT_LM, Architecture, architecture_for
from pivotmerge.repos.lora import AdapterRepo, is_adapter
from pivotmerge.repos.model_repo import ModelRepo, TensorInfo, locate
from pivotmerge.repos.vocab import is_vocabulary_tensor


def open_input(ref: str, base: ModelRepo | None, *, allowed_roots: Sequence[Path] | None = None,
               relative_to: Path | None = None, allow_downloads: bool = False) -> ModelRepo:
    """A merge input read as a full model like `base`: a model folder as it is, an adapter as the
    model it makes of `base`, a text-only LM as `base` with the LM's weights in its language model."""
    path = locate(ref, allowed_roots=allowed_roots, relative_to=relative_to, allow_downloads=allow_downloads)
    if is_adapter(path):
        if base is None:
            raise RepoError(f"{ref}: a LoRA adapter; give the model it adapts as base_model")
        return AdapterRepo.over(ref, path, base, architecture_for(base.model_type).canonical, allowed_roots)
    repo = ModelRepo.open(ref, allowed_roots=allowed_roots, path=path)
    if base is not None and repo.model_type in TEXT_LM.model_types and base.model_type not in TEXT_LM.model_types:
        try:
            return TextLMRepo.into(repo, base)
        except RepoError:
            repo.close()
            raise
    return repo


@dataclass
class TextLMRepo(ModelRepo):
    """A text-only causal LM read as the base VLM with the LM's weights in its language model.

    The family table's `text_prefix` declares where the LM's ``model.*`` tensors sit in the VLM
    (``model.language_model.*``, Idefics3's ``model.text_model.*``); ``lm_head`` stays ``lm_head``.
    The VLM's other tensors (vision tower, projector) are the base's: the LM leaves them unchanged.
    """

    base: ModelRepo = field(default=None, repr=False)  # type: ignore[assignment]
    own: frozenset[str] = frozenset()  # the base's names whose values come from the LM
    short: dict[str, int] = field(default_factory=dict)  # vocabulary tensors where the LM has fewer rows: its rows

    @classmethod
    def into(cls, lm: ModelRepo, base: ModelRepo) -> "TextLMRepo":
        vlm = architecture_for(base.model_type)
        by_canonical = {vlm.canonical(n): n for n in base.tensors}
        tensors: dict[str, TensorInfo] = dict(base.tensors)
        mapped: dict[str, TensorInfo] = {}
        short: dict[str, int] = {}  # vocabulary tensors with fewer rows than the base's: rows the LM has
        for name, info in lm.tensors.items():
            target = by_canonical.get(_in_vlm(name, vlm))
            if target is None:
                raise RepoError(f"{lm.ref}: text-only {lm.model_type} model does not line up with {base.ref}'s "
                                f"language model: its {name} has no place there (as {_in_vlm(name, vlm)})")
            want = base.tensors[target].shape
            if is_vocabulary_tensor(vlm, target) and info.shape[1:] == want[1:]:
                if info.shape[0] < want[0]:  # the VLM added tokens (an image token): those rows stay the base's
                    short[target] = info.shape[0]
                    info = TensorInfo(want, info.dtype, info.file, info.offset)
            elif info.shape != want:
                raise RepoError(f"{lm.ref}: text-only {lm.model_type} model does not line up with {base.ref}'s "
                                f"language model: {name} has shape {list(info.shape)}, {target} has {list(want)}")
            mapped[target] = info
        head, embed = by_canonical.get("lm_head.weight"), by_canonical.get(vlm.text_prefix + "embed_tokens.weight")
        if head is not None and head not in mapped and lm.config.get("tie_word_embeddings") and embed in mapped:
            mapped[head] = mapped[embed]  # the LM ties its head to its embeddings; the VLM stores both
            if embed in short:
                short[head] = short[embed]
        lm_names = {n for n in base.tensors if vlm.component(n) == "language_model"}
        missing = sorted(lm_names - mapped.keys())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise RepoError(f"{lm.ref}: text-only {lm.model_type} model does not line up with {base.ref}'s language "
                            f"model: it has nothing for {missing[0]}{more}")
        tensors.update(mapped)
        return cls(ref=lm.ref, path=lm.path, config=base.config, tensors=tensors, _fds=lm._fds, base=base,
                   own=frozenset(mapped), short=short)

    @property
    def kind(self) -> str:
        return "text-only LM"

    def get(self, name: str) -> torch.Tensor:
        if name not in self.own:
            return self.base.get(name)
        if name not in self.short:
            return super().get(name)
        info = self.tensors[name]
        rows = self.short[name]
        own = ModelRepo.get(replace(self, tensors={name: TensorInfo((rows, *info.shape[1:]), info.dtype, info.file,
                                                                    info.offset)}), name)
        return torch.cat([own, self.base.get(name)[rows:]])


def _in_vlm(name: str, vlm: Architecture) -> str:
    """A text-only LM's tensor name as the VLM family names it (current style)."""
    return vlm.text_prefix + name.removeprefix("model.") if name.startswith("model.") else name
