"""Experts whose vocabulary extends the base's (added tokens, e.g. an image token).

The embedding and the LM head have one row per token id. An expert that added
tokens has more rows than the base; shared ids must mean the same tokens. The
output takes the base's tokenizer, and an expert's rows for tokens outside it
are dropped (policy ``base``) or, with ``tokenizer: union``, appended after the
base's rows, taken from the first expert that has the token (not merged: the
other inputs have no such row). Appending is done by giving every input the
same value for an appended row, so whatever the method, the merged row is that
value; the output's tokenizer files and config then count the added tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from pivotmerge.errors import CompatibilityError
from pivotmerge.repos.architectures import Architecture
from pivotmerge.repos.model_repo import ModelRepo, TensorInfo


def is_vocabulary_tensor(arch: Architecture, name: str) -> bool:
    canonical = arch.canonical(name)
    return canonical == "lm_head.weight" or canonical.endswith("embed_tokens.weight")


@dataclass
class Vocabulary:
    """What the merge did with tokens outside the base's vocabulary (recorded in the report)."""

    policy: str
    base_rows: int
    dropped: dict[str, list[str]] = field(default_factory=dict)  # input ref -> its tokens left out
    appended: list[tuple[str, str]] = field(default_factory=list)  # (token, input ref it came from), in row order

    def report(self) -> dict[str, Any]:
        return {"policy": self.policy, "base_rows": self.base_rows, "rows": self.base_rows + len(self.appended),
                "dropped": self.dropped, "appended": [{"token": t, "source": ref} for t, ref in self.appended]}


@dataclass
class VocabularyView(ModelRepo):
    """`inner` with its vocabulary tensors cut to the base's rows plus the appended ones."""

    inner: ModelRepo = field(default=None, repr=False)  # type: ignore[assignment]
    rows: dict[str, list[tuple[ModelRepo, int]]] = field(default_factory=dict)  # appended rows: (source, its row)
    base_rows: int = 0

    @property
    def kind(self) -> str:
        return self.inner.kind

    def get(self, name: str) -> torch.Tensor:
        if name not in self.rows:
            return self.inner.get(name)
        own = self.inner.get(name)[: self.base_rows]
        extra = [source.get(name)[row] for source, row in self.rows[name]]
        return torch.cat([own, torch.stack(extra)]) if extra else own

    def close(self) -> None:
        self.inner.close()


def _tokens(repo: ModelRepo) -> list[str] | None:
    """Token of each id from the repo's tokenizer.json (None when the repo carries no tokenizer)."""
    path = repo.path / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab: dict[str, int] = dict(data.get("model", {}).get("vocab") or {})
    if isinstance(data.get("model", {}).get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(data["model"]["vocab"])}
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    out: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out  # type: ignore[return-value]


def align_vocabularies(reference: ModelRepo, inputs: Sequence[ModelRepo], arch: Architecture,
                       policy: str) -> tuple[list[ModelRepo], Vocabulary | None]:
    """`inputs` (the reference among them) with vocabulary tensors cut (and with `union`, extended)
    to the output's rows, and what was done; the inputs unchanged when their vocabularies agree."""
    names = [n for n in reference.tensors if is_vocabulary_tensor(arch, n)]
    others = [r for r in inputs if r is not reference]
    if not names or all(o.tensors.get(n) is None or o.tensors[n].shape == reference.tensors[n].shape
                        for o in others for n in names):
        return list(inputs), None
    base_rows = reference.tensors[names[0]].shape[0]
    base_tokens = _tokens(reference)
    vocab = Vocabulary(policy, base_rows)
    appended: list[tuple[ModelRepo, int]] = []
    seen = set(base_tokens or ())
    for repo in others:
        info = repo.tensors.get(names[0])
        if info is None or info.shape[0] == base_rows:
            continue
        if info.shape[0] < base_rows:
            raise CompatibilityError(f"{repo.ref}: {names[0]} has {info.shape[0]} rows, fewer than {reference.ref}'s "
                                     f"{base_rows}; an expert may add tokens to the base's vocabulary, not lack them")
        tokens = _tokens(repo)
        if base_tokens is not None and tokens is not None and tokens[: len(base_tokens)] != base_tokens[: len(tokens)]:
            raise CompatibilityError(f"{repo.ref}: its tokenizer gives the base's token ids to other tokens; "
                                     f"only vocabularies that extend {reference.ref}'s can be merged")
        extra = [(i, tokens[i] if tokens is not None and i < len(tokens) else None)
                 for i in range(base_rows, info.shape[0])]
        kept = [(i, t) for i, t in extra if policy == "union" and t is not None and t not in seen]
        vocab.dropped[repo.ref] = [t if t is not None else f"<row {i}>" for i, t in extra if (i, t) not in kept]
        for i, token in kept:
            seen.add(token)
            appended.append((repo, i))
            vocab.appended.append((token, repo.ref))
    rows = len(appended)

    def view(repo: ModelRepo) -> ModelRepo:
        tensors = dict(repo.tensors)
        for n in names:
            if n not in repo.tensors:
                continue
            info = repo.tensors[n]
            tensors[n] = TensorInfo((base_rows + rows, *info.shape[1:]), info.dtype, info.file, info.offset)
        return VocabularyView(ref=repo.ref, path=repo.path, config=repo.config, tensors=tensors, inner=repo,
                              rows={n: appended for n in names}, base_rows=base_rows)

    return [view(r) for r in inputs], vocab


def write_tokenizer(reference: Path, out: Path, vocab: Vocabulary) -> None:
    """The base's tokenizer with the appended tokens, and the config's vocabulary size to match."""
    if vocab.appended:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(reference)
        tokenizer.add_tokens([t for t, _ in vocab.appended], special_tokens=False)
        tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        target = config.get("text_config", config)
        target["vocab_size"] = vocab.base_rows + len(vocab.appended)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
