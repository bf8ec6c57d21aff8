"""Where the merge maths runs, and the output dtypes a spec may name."""

from __future__ import annotations

import torch

from pivotmerge.errors import SpecError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SpecError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(requested)

