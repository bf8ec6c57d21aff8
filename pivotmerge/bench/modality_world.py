"""Synthetic image-text data for the modality study, built in code as tensors.

A scene colours one of an image's four quadrants (the project's palette and position
words, pivotmerge/data/example.py) on a dark, noisy ground, one patch per quadrant.
(Two coloured quadrants per scene asked the tiny models to bind words to patches by
attention, which they did not learn within this suite's budget: fused masked-language
loss stayed at the text-only loss over 400 steps.) From scenes come:

* pre-training batches: the image alone, its caption alone, and the pair (a caption
  that is another scene's half the time, for image-text matching);
* ``retrieval``: images and their captions, matched by a dual encoder;
* ``vqa``: "what colour is the top left ?", answered with a colour or ``none``;
* ``nlvr``: two images and a statement "the top left is red", true when it holds in both.

A caption ("the top left is red") describes exactly one kind of scene, so a retrieved
caption is right when it equals the query's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pivotmerge.data.example import COLOURS, ROWS, SIDES

PAD, MASK, CLS = "[PAD]", "[MASK]", "[CLS]"
COLOUR_NAMES = tuple(COLOURS)
QUADRANTS = tuple((row, side) for row in ROWS for side in SIDES)
ANSWERS = COLOUR_NAMES + ("none",)
VOCAB = (PAD, MASK, CLS, "the", "is", "what", "colour", "?") + ROWS + SIDES + COLOUR_NAMES
TOKEN = {w: i for i, w in enumerate(VOCAB)}
TEXT_LEN = 8  # [CLS] what colour is the r s ?
IMAGE_SIZE = 16
PATCH_SIZE = 8  # one patch per quadrant
GRID = IMAGE_SIZE // PATCH_SIZE
_PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255.0


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: which quadrant is coloured, in which colour (indices)."""

    quadrants: torch.Tensor  # (n,) quadrant indices
    colours: torch.Tensor  # (n,) colour indices

    def __len__(self) -> int:
        return self.quadrants.shape[0]

    def colour_at(self, quadrant: torch.Tensor) -> torch.Tensor:
        """The colour index of `quadrant` in each scene, or len(COLOUR_NAMES) (``none``) when it is dark."""
        return torch.where(self.quadrants == quadrant, self.colours, len(COLOUR_NAMES))


def scenes(n: int, g: torch.Generator) -> Scenes:
    return Scenes(torch.randint(0, len(QUADRANTS), (n,), generator=g), torch.randint(0, len(COLOUR_NAMES), (n,), generator=g))


def render(s: Scenes, g: torch.Generator) -> torch.Tensor:
    """Images (n, 3, 16, 16) in [0, 1]: dark noise, one coloured quadrant."""
    n, half = len(s), IMAGE_SIZE // 2
    images = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 0.15
    for q in range(len(QUADRANTS)):
        rows = (s.quadrants == q).nonzero().flatten()
        r, c = divmod(q, 2)
        images[rows, :, r * half:(r + 1) * half, c * half:(c + 1) * half] = _PALETTE[s.colours[rows]][:, :, None, None]
    return images


def _ids(words: list[str]) -> list[int]:
    ids = [TOKEN[w] for w in words]
    return ids + [TOKEN[PAD]] * (TEXT_LEN - len(ids))


def _clause(quadrant: int, colour: int) -> list[str]:
    row, side = QUADRANTS[quadrant]
    return ["the", row, side, "is", COLOUR_NAMES[colour]]


def captions(s: Scenes) -> torch.Tensor:
    return statements(s.quadrants, s.colours)


def questions(quadrant: torch.Tensor) -> torch.Tensor:
    return torch.tensor([_ids([CLS, "what", "colour", "is", "the", *QUADRANTS[int(q)], "?"]) for q in quadrant])


def statements(quadrant: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    return torch.tensor([_ids([CLS] + _clause(int(q), int(c))) for q, c in zip(quadrant, colour)])


def attention_mask(ids: torch.Tensor) -> torch.Tensor:
    return (ids != TOKEN[PAD]).long()


def mask_tokens(ids: torch.Tensor, rate: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-language-model input and targets (-100 where not masked); [CLS] and padding are never masked."""
    maskable = (ids != TOKEN[PAD]) & (ids != TOKEN[CLS])
    chosen = (torch.rand(ids.shape, generator=g) < rate) & maskable
    chosen[chosen.flatten(1).sum(1) == 0, 1] = True  # at least one target per caption
    return ids.masked_fill(chosen, TOKEN[MASK]), ids.masked_fill(~chosen, -100)


def pretraining_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch for the three pre-training inputs: images, captions, and image-caption pairs."""
    s = scenes(n, g)
    images, caps = render(s, g), captions(s)
    text_in, text_target = mask_tokens(caps, 0.25, g)
    fused_in, fused_target = mask_tokens(caps, 0.25, g)
    # Image-text matching: half the pairs get another scene's caption (which may happen to fit).
    other = captions(scenes(n, g))
    matched = torch.rand(n, generator=g) < 0.5
    pair_text = torch.where(matched[:, None], caps, other)
    matched = matched | (pair_text == caps).all(1)
    # Masked image modelling: a quarter of the patches blanked, their mean colour predicted.
    patch_mask = torch.rand(n, GRID * GRID, generator=g) < 0.25
    pixel_mask = (patch_mask.view(n, 1, GRID, 1, GRID, 1).expand(n, 1, GRID, PATCH_SIZE, GRID, PATCH_SIZE)
                  .reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    patch_colours = (images.view(n, 3, GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean((3, 5)).permute(0, 2, 3, 1)
                     .reshape(n, -1, 3))
    return {"images": images, "masked_images": images.masked_fill(pixel_mask, 0.0), "patch_mask": patch_mask,
            "patch_colours": patch_colours, "text_in": text_in, "text_target": text_target, "fused_in": fused_in,
            "fused_target": fused_target, "pair_text": pair_text, "matched": matched.long()}


def retrieval_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    s = scenes(n, g)
    return {"images": render(s, g), "captions": captions(s)}


def vqa_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    s = scenes(n, g)
    # Ask about a coloured quadrant two times in three, else about a dark one (answer "none").
    asked = torch.where(torch.rand(n, generator=g) < 2 / 3, s.quadrants, torch.randint(0, len(QUADRANTS), (n,), generator=g))
    return {"images": render(s, g), "questions": questions(asked), "answers": s.colour_at(asked)}


def nlvr_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    first, second = scenes(n, g), scenes(n, g)
    # Statements about the first image, so "true" needs the second image to agree; half of the pairs are made to.
    agree = torch.rand(n, generator=g) < 0.5
    second = Scenes(torch.where(agree, first.quadrants, second.quadrants), torch.where(agree, first.colours, second.colours))
    label = (second.colour_at(first.quadrants) == first.colours).long()
    return {"images": render(first, g), "images_2": render(second, g), "statements": statements(first.quadrants, first.colours),
            "labels": label}
