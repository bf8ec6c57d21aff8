"""Write small safetensors model folders for tests (no transformers needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file


def write_repo(folder: Path, tensors: Mapping[str, torch.Tensor], *, model_type: str = "llava",
               shards: int = 1, extra_files: Mapping[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    names = list(tensors)
    if shards == 1:
        save_file(dict(tensors), str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def llava_like(seed: int, hidden: int = 4, layers: int = 2) -> dict[str, torch.Tensor]:
    """Tensor names laid out like a LLaVA checkpoint, with seeded values."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "multi_modal_projector.linear_1.weight": torch.randn(hidden, hidden, generator=g),
        "multi_modal_projector.linear_1.bias": torch.randn(hidden, generator=g),
        "multi_modal_projector.linear_2.weight": torch.randn(hidden, hidden, generator=g),
        "multi_modal_projector.linear_2.bias": torch.randn(hidden, generator=g),
        "vision_tower.embeddings.position_ids": torch.arange(hidden, dtype=torch.int64),
        "language_model.model.embed_tokens.weight": torch.randn(8, hidden, generator=g),
    }
    for i in range(layers):
        out[f"language_model.model.layers.{i}.mlp.up_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        out[f"vision_tower.encoder.layers.{i}.mlp.fc1.weight"] = torch.randn(hidden, hidden, generator=g)
    return out
