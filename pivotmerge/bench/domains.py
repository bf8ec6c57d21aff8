"""The suite's four image-caption domains, written in the project's dataset format.

`shapes`, `stripes` and `dots` are the example's renderers (pivotmerge/data/example.py);
`quadrants` colours one quarter of the image ("the top left is red"). Colour,
row and side words recur across domains, so the domains compete for the same
output tokens and a projector for one domain misleads the others.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pivotmerge.data.example import COLOURS, RENDERERS, ROWS, SIDES, Rendered, _canvas

DOMAINS = ("shapes", "stripes", "dots", "quadrants")
SPLITS = ("train", "dev", "test", "calib")


def render_quadrants(rng: np.random.Generator, size: int) -> Rendered:
    colour, row, side = str(rng.choice(list(COLOURS))), str(rng.choice(ROWS)), str(rng.choice(SIDES))
    arr = _canvas(size, rng)
    half = size // 2
    rows = slice(0, half) if row == "top" else slice(half, size)
    cols = slice(0, half) if side == "left" else slice(half, size)
    arr[rows, cols] = COLOURS[colour]
    return Rendered(Image.fromarray(arr), f"the {row} {side} is {colour}", "what colour is the side ?", colour)


RENDER = {**RENDERERS, "quadrants": render_quadrants}


def write_split(out: Path, domain: str, n: int, seed: Sequence[int], image_size: int) -> Path:
    """`n` captioned images of `domain` as `out/data.jsonl` beside `out/images/` (captions only:
    the suite scores caption tokens)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(seed))
    lines = []
    for i in range(n):
        sample = RENDER[domain](rng, image_size)
        rel = f"images/{i:05d}.png"
        sample.image.save(out / rel)
        lines.append(json.dumps({"image": rel, "caption": sample.caption}))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
