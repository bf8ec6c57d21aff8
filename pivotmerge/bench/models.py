"""The suite's tiny LLaVA-style model: vision tower -> 2-layer MLP projector -> language model.

Both towers are pre-trained briefly here and then frozen, as in stage-1 LLaVA
alignment: the vision tower as a denoising autoencoder on the images of all
domains (no caption labels leak into it), the language model on the text of all
domains. Only the projector is trained per domain, so the projector's weights
are what the merge methods combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pivotmerge.bench.domains import PAD, SIZE, VOCAB, Split

D_VISION, D_HIDDEN, D_LM, D_GRU = 32, 128, 64, 128
PREFIX = 4  # vision tokens: a 2x2 grid of pooled patches
PROJECTOR_LAYERS = ("fc1", "fc2")

State = dict[str, torch.Tensor]


class VisionTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, D_VISION, 3, padding=1),
        )
        self.decoder = nn.Linear(PREFIX * D_VISION, 3 * SIZE * SIZE)  # used only in pre-training

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> PREFIX patch features, B x PREFIX x D_VISION."""
        grid = F.adaptive_avg_pool2d(self.convs(images), 2)
        return grid.flatten(2).transpose(1, 2)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.forward(images).flatten(1)).view_as(images)


class LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), D_LM, padding_idx=PAD)
        self.gru = nn.GRU(D_LM, D_GRU, batch_first=True)
        self.head = nn.Linear(D_GRU, len(VOCAB))

    def forward(self, texts: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits for positions 0..L-2 of ``texts`` (after an optional embedding prefix)."""
        x = self.embed(texts[:, :-1])
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        out, _ = self.gru(x)
        return self.head(out[:, x.shape[1] - (texts.shape[1] - 1):])


class Projector(nn.Module):
    """The merged part: vision features -> language-model input embeddings, per patch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_VISION, D_HIDDEN)
        self.fc2 = nn.Linear(D_HIDDEN, D_LM)

    def hidden(self, feats: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc1(feats))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(feats))


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(n, (batch,), generator=gen)


def pretrain_vision(images: torch.Tensor, steps: int, gen: torch.Generator) -> VisionTower:
    tower = VisionTower()
    opt = torch.optim.Adam(tower.parameters(), lr=3e-3)
    for idx in _batches(len(images), 128, steps, gen):
        clean = images[idx]
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=gen)
        loss = F.mse_loss(tower.reconstruct(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tower.requires_grad_(False).eval()


def text_loss(logits: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), texts[:, 1:].reshape(-1), ignore_index=PAD)


def pretrain_lm(splits: list[Split], steps: int, gen: torch.Generator) -> LanguageModel:
    """Text-only pre-training: each caption or QA row follows its image's keywords.

    The keywords play the image's part, so the language model learns to read
    content from a PREFIX-token context (as a real LLM reads any context) and the
    projector's job becomes producing such a context from vision features.
    """
    width = max(s.texts.shape[1] for s in splits)
    texts = torch.cat([F.pad(s.texts, (0, width - s.texts.shape[1]), value=PAD) for s in splits])
    context = torch.cat([s.keywords[s.image_index] for s in splits])
    lm = LanguageModel()
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for idx in _batches(len(texts), 128, steps, gen):
        loss = text_loss(lm(texts[idx], lm.embed(context[idx])), texts[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.requires_grad_(False).eval()


@dataclass
class Encoded:
    """A split with its frozen vision features computed once."""

    split: Split
    feats: torch.Tensor  # N x PREFIX x D_VISION


def encode_split(tower: VisionTower, split: Split) -> Encoded:
    with torch.no_grad():
        return Encoded(split, tower(split.images))


def _row_loss(lm: LanguageModel, projector: Projector, data: Encoded, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target cross-entropy and argmax-correctness of the given rows (B x L-1 each)."""
    s = data.split
    logits = lm(s.texts[rows], projector(data.feats[s.image_index[rows]]))
    targets = s.texts[rows, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ce, logits.argmax(-1) == targets


def train_projector(projector: Projector, lm: LanguageModel, data: list[Encoded], steps: int, lr: float,
                    gen: torch.Generator, snapshots: tuple[int, ...] = ()) -> dict[int, State]:
    """Adam on the scored tokens of captions and QA rows; returns the state at ``snapshots`` and at the end."""
    opt = torch.optim.Adam(projector.parameters(), lr=lr)
    sizes = torch.tensor([len(d.split.texts) for d in data], dtype=torch.float)
    saved: dict[int, State] = {}
    for step in range(1, steps + 1):
        # 64 rows of every domain in the mix per step: the joint projector sees each
        # domain as often as that domain's expert does.
        loss = torch.zeros(())
        for d, n in zip(data, sizes.long().tolist()):
            rows = torch.randint(n, (64,), generator=gen)
            ce, _ = _row_loss(lm, projector, d, rows)
            mask = d.split.target_mask[rows]
            loss = loss + (ce * mask).sum() / mask.sum() / len(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in snapshots or step == steps:
            saved[step] = {k: v.detach().clone() for k, v in projector.state_dict().items()}
    return saved


@dataclass(frozen=True)
class Scores:
    caption_loss: float
    token_accuracy: float
    qa_exact_match: float

    def as_dict(self) -> dict[str, float]:
        return {"caption_loss": self.caption_loss, "token_accuracy": self.token_accuracy,
                "qa_exact_match": self.qa_exact_match}


@torch.no_grad()
def evaluate(state: State, lm: LanguageModel, data: Encoded) -> Scores:
    """Caption loss and token accuracy (teacher forced) and QA exact match.

    QA exact match under greedy decoding equals "every answer token, and the end
    token after it, is the argmax under teacher forcing": greedy decoding follows
    the reference exactly as long as each step is right, so one batched forward
    pass scores it.
    """
    projector = Projector()
    projector.load_state_dict(state)
    rows = torch.arange(len(data.split.texts))
    ce, correct = _row_loss(lm, projector, data, rows)
    mask, qa = data.split.target_mask, data.split.is_qa
    cap = mask & ~qa[:, None]
    exact = (correct | ~mask)[qa].all(dim=1)
    return Scores(
        caption_loss=float(ce[cap].mean()),
        token_accuracy=float(correct[cap].float().mean()),
        qa_exact_match=float(exact.float().mean()),
    )


@torch.no_grad()
def layer_inputs(state: State, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each projector layer sees as input, one row per vision token (for Gram matrices)."""
    projector = Projector()
    projector.load_state_dict(state)
    x = feats.reshape(-1, D_VISION)
    return {"fc1": x, "fc2": projector.hidden(x)}
