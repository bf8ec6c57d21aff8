"""Synthetic image-caption domains for the quality suite.

Four domains that differ both in what the images look like and in how their
captions are phrased, so that a projector aligned on one domain is a poor fit
for the others (the heterogeneity the merge methods must bridge). Every image is
3x12x12 in [0, 1]; every caption and QA probe uses one shared word vocabulary,
and number and colour words recur across domains, so the domains compete for
the same output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SIZE = 12
COLOURS = {
    "red": (1.0, 0.15, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1), "purple": (0.7, 0.15, 0.9), "cyan": (0.1, 0.9, 0.9),
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SHAPES = ["square", "circle", "triangle", "cross"]
VPOS, HPOS = ["top", "bottom"], ["left", "right"]
ORIENTATIONS = ["horizontal", "vertical", "diagonal", "checkered"]
WIDTHS = ["thin", "wide"]

SPECIALS = ["<pad>", "<bos>", "<eos>"]
WORDS = sorted(set(
    list(COLOURS) + NUMBERS + SHAPES + VPOS + HPOS + ORIENTATIONS + WIDTHS
    + "a in the this is handwritten digit stripes colored there are dots on dark ground"
      " q a: ? what colour shape where which pattern how many width".split()
))
VOCAB = SPECIALS + WORDS
TOKEN = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS = TOKEN["<pad>"], TOKEN["<bos>"], TOKEN["<eos>"]
DOMAINS = ("shapes", "digits", "textures", "counts")


@dataclass
class Sample:
    image: np.ndarray  # 3 x SIZE x SIZE, float32
    caption: list[str]
    qa: list[tuple[list[str], list[str]]]  # (question words, answer words)
    # The image's content as PREFIX words: the text-only stand-in for the image
    # in language-model pre-training (see models.pretrain_lm).
    keywords: list[str]


def _blank(rng: np.random.Generator) -> np.ndarray:
    return (rng.random((3, SIZE, SIZE)) * 0.08).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour: str) -> None:
    img[:, mask] = np.asarray(COLOURS[colour], dtype=np.float32)[:, None]


def _shape_mask(shape: str, top: int, left: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    y, x = yy - top, xx - left
    inside = (y >= 0) & (y < size) & (x >= 0) & (x < size)
    c = (size - 1) / 2
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & ((y - c) ** 2 + (x - c) ** 2 <= (size / 2) ** 2)
    if shape == "triangle":
        return inside & (np.abs(x - c) <= y / 2 + 0.5)
    return inside & ((np.abs(x - c) < 1.0) | (np.abs(y - c) < 1.0))  # cross


def shapes_sample(rng: np.random.Generator) -> Sample:
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    v, h = rng.integers(2), rng.integers(2)
    size = int(rng.integers(4, 6))
    top = int(rng.integers(0, SIZE // 2 - size + 1)) + v * SIZE // 2  # inside its quadrant
    left = int(rng.integers(0, SIZE // 2 - size + 1)) + h * SIZE // 2
    img = _blank(rng)
    _paint(img, _shape_mask(shape, top, left, size), colour)
    return Sample(img, ["a", colour, shape, "in", "the", VPOS[v], HPOS[h]],
                  [(["what", "colour"], [colour]), (["what", "shape"], [shape]), (["where"], [VPOS[v], HPOS[h]])],
                  [colour, shape, VPOS[v], HPOS[h]])


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    img = torch.nn.functional.interpolate(img, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return img[:, 0].numpy(), d.target


def digits_sample(rng: np.random.Generator) -> Sample:
    images, labels = _digits()
    i = int(rng.integers(len(labels)))
    img = np.repeat(images[i][None], 3, axis=0) * float(rng.uniform(0.7, 1.0)) + _blank(rng)
    word = NUMBERS[labels[i]]
    return Sample(img.astype(np.float32), ["this", "is", "a", "handwritten", word],
                  [(["which", "digit"], [word])], ["handwritten", "digit", word, word])


def textures_sample(rng: np.random.Generator) -> Sample:
    colour, orient, width = rng.choice(list(COLOURS)), rng.choice(ORIENTATIONS), int(rng.integers(2))
    period = 2 + 2 * width
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + rng.integers(0, period, size=2)[:, None, None]
    coord = {"horizontal": yy, "vertical": xx, "diagonal": yy + xx}.get(orient)
    mask = ((yy // (period // 2 + 1) + xx // (period // 2 + 1)) % 2 == 0) if coord is None else (coord % period < period // 2)
    img = _blank(rng)
    _paint(img, mask, colour)
    return Sample(img, [WIDTHS[width], orient, "stripes", "colored", colour],
                  [(["what", "pattern"], [orient]), (["what", "width"], [WIDTHS[width]]), (["what", "colour"], [colour])],
                  [WIDTHS[width], orient, "stripes", colour])


def counts_sample(rng: np.random.Generator) -> Sample:
    colour, n = rng.choice(list(COLOURS)), int(rng.integers(1, 6))
    cells = rng.choice(16, size=n, replace=False)  # 4x4 grid of 3x3 cells, one dot per cell
    img = _blank(rng)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    for c in cells:
        y, x = 3 * (c // 4) + int(rng.integers(2)), 3 * (c % 4) + int(rng.integers(2))
        mask[y:y + 2, x:x + 2] = True
    _paint(img, mask, colour)
    return Sample(img, ["there", "are", NUMBERS[n], colour, "dots", "on", "dark", "ground"],
                  [(["how", "many"], [NUMBERS[n]]), (["what", "colour"], [colour])],
                  [NUMBERS[n], colour, "dots", "ground"])


GENERATORS = {"shapes": shapes_sample, "digits": digits_sample, "textures": textures_sample, "counts": counts_sample}


@dataclass
class Split:
    """One domain split as tensors: images and text rows (captions and QA probes)."""

    images: torch.Tensor  # N x 3 x SIZE x SIZE
    keywords: torch.Tensor  # N x 4 tokens
    texts: torch.Tensor  # R x L token rows, right-padded
    image_index: torch.Tensor  # R, the image each row describes
    target_mask: torch.Tensor  # R x (L-1), which next-token targets are scored
    is_qa: torch.Tensor  # R, bool: QA probe (scored on the answer only) or caption

    def __len__(self) -> int:
        return len(self.images)


def encode(words: list[str]) -> list[int]:
    return [TOKEN[w] for w in words]


def caption_tokens(sample: Sample) -> list[int]:
    return [BOS] + encode(sample.caption) + [EOS]


def qa_tokens(question: list[str], answer: list[str]) -> tuple[list[int], int]:
    """A QA string and the length of its prompt (the answer is what gets scored)."""
    prompt = [BOS] + encode(["q", *question, "?", "a:"])
    return prompt + encode(answer) + [EOS], len(prompt)


def make_split(domain: str, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    samples = [GENERATORS[domain](rng) for _ in range(n)]
    rows: list[tuple[int, list[int], int, bool]] = []  # image, tokens, first scored token, is_qa
    for i, s in enumerate(samples):
        rows.append((i, caption_tokens(s), 1, False))
        rows.extend((i, *qa_tokens(q, a), True) for q, a in s.qa)
    width = max(len(r[1]) for r in rows)
    texts = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for j, (_, tokens, first, _) in enumerate(rows):
        texts[j, :len(tokens)] = torch.tensor(tokens)
        mask[j, first - 1:len(tokens) - 1] = True  # target t+1 is predicted at position t
    return Split(
        images=torch.tensor(np.stack([s.image for s in samples])),
        keywords=torch.tensor([encode(s.keywords) for s in samples]),
        texts=texts,
        image_index=torch.tensor([r[0] for r in rows]),
        target_mask=mask,
        is_qa=torch.tensor([r[3] for r in rows]),
    )
