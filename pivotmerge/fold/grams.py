"""Gram matrices for RegMean folding, measured through a model's own routed forward pass.

The model is loaded with `AutoModel.from_pretrained` (any architecture transformers or
this project registers; no remote code) and run on `calibration_inputs`: safetensors
files whose tensors are the forward pass's keyword arguments (``pixel_values``,
``input_ids``, ...), batched along their first dimension; one file per kind of input
(images alone, texts alone, pairs), so a model that routes each kind to its own experts
gives every expert its tokens. Forward pre-hooks on the named
nn.Linear modules of each modality's expert sum ``X^T X`` of exactly the tokens the model
routes to that expert, so nothing here knows the architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import pivotmerge.models.multiway  # noqa: F401  (registers the project's models with the Auto classes)
from pivotmerge.data.calibration import GramCollector, linear_modules
from pivotmerge.errors import SpecError

FIELD = "calibration_inputs"


def load_inputs(path: Path, allowed_roots: Sequence[Path] | None = None) -> dict[str, torch.Tensor]:
    """The forward keyword arguments stored in `path`, checked to share one batch dimension."""
    resolved = path.expanduser().resolve()
    if allowed_roots is not None and not any(resolved.is_relative_to(r) for r in allowed_roots):
        raise SpecError(f"{FIELD}: {path} is outside the allowed folders")
    if not resolved.is_file():
        raise SpecError(f"{FIELD}: {path}: no such file")
    try:
        inputs = load_file(str(resolved))
    except (SafetensorError, OSError) as exc:
        raise SpecError(f"{FIELD}: {path} is not a safetensors file: {exc}") from None
    sizes = {t.shape[0] if t.ndim else 0 for t in inputs.values()}
    if not inputs or len(sizes) != 1 or 0 in sizes:
        raise SpecError(f"{FIELD}: {path} needs one or more tensors batched along one first dimension")
    return inputs


@torch.no_grad()
def routed_grams(model: nn.Module, inputs: Sequence[Mapping[str, torch.Tensor]], tensor_names: Iterable[str],
                 batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of the inputs each named linear weight's module sees in `model`'s forward passes;
    names that are not an nn.Linear's weight are left out (RegMean averages them)."""
    modules = linear_modules(model, tensor_names)
    device = next(model.parameters()).device
    batches = ({k: v[start:start + batch_size].to(device) for k, v in kind.items()}
               for kind in inputs for start in range(0, next(iter(kind.values())).shape[0], batch_size))
    with GramCollector(modules) as collector:
        for batch in batches:
            collector.token_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
            try:
                model(**batch)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise SpecError(f"{FIELD}: the model's forward pass rejects these inputs: "
                                f"{str(exc).splitlines()[0]}") from None
    return {n: g.cpu() for n, g in collector.grams.items()}


def collect_routed_grams(model_dir: Path, inputs: Sequence[Mapping[str, torch.Tensor]], tensor_names: Iterable[str],
                         device: str = "cpu") -> dict[str, torch.Tensor]:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the fold's own progress is shown; a second bar would garble it
    try:
        model = AutoModel.from_pretrained(str(model_dir)).float().to(device).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return routed_grams(model, inputs, tensor_names)
