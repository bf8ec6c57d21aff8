"""What a spec's `model:` may point at: a model folder (or hub id), or a LoRA adapter over the base."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pivotmerge.errors import RepoError
from pivotmerge.repos.architectures import architecture_for
from pivotmerge.repos.lora import AdapterRepo, is_adapter
from pivotmerge.repos.model_repo import ModelRepo, locate


def open_input(ref: str, base: ModelRepo | None, *, allowed_roots: Sequence[Path] | None = None,
               relative_to: Path | None = None) -> ModelRepo:
    """A merge input read as a full model: a model folder as it is, an adapter as the model it makes of `base`."""
    path = locate(ref, allowed_roots=allowed_roots, relative_to=relative_to)
    if is_adapter(path):
        if base is None:
            raise RepoError(f"{ref}: a LoRA adapter; give the model it adapts as base_model")
        return AdapterRepo.over(ref, path, base, architecture_for(base.model_type).canonical, allowed_roots)
    return ModelRepo.open(ref, allowed_roots=allowed_roots, relative_to=relative_to)
