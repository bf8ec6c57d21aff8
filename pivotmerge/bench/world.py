"""One seed's world for the quality suite: real LLaVA folders and datasets, built and cached on disk.

The world follows LLaVA's recipe at toy scale (docs/results.md):

1. a CLIP vision tower is pre-trained alone with a supervised objective on image
   content (each image's caption words, multi-label), so it encodes what the
   captions need before any projector exists;
2. a Llama language model learns to caption, reading image tokens made by a
   *different* tower (same recipe, another seed) through a throw-away projector,
   so it is tied to no projector;
3. the shared initialisation (`base/`) joins the first tower, a fresh random
   projector (LLaVA's stage 1) and that language model;
4. from it, one expert per domain trains on its domain what the config's `trains`
   names, and the joint model on all domains, seeing each as often as its expert
   does (Adam, linear warm-up then cosine decay). The projector suite's experts
   train the projector alone (LLaVA's stage 1); the deep suite's also train the
   whole language model and the tower's top layers, as ShareGPT4V- and
   InternVL-style alignment does, so a merge spans tens of layers.

Training uses torch directly on the Hugging Face model: it builds the world. The
merges and the scores go through the product (`pivotmerge.merge`, the evaluator).
Everything is a function of the config and the seed (built on one thread, whatever
the caller's setting); a built world is kept under its key, so a second run with the
same config and seed reads it back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from pivotmerge.bench.domains import DOMAINS, SPLITS, write_split
from pivotmerge.bench.threads import torch_threads
from pivotmerge.data.datasets import Dataset, load_dataset
from pivotmerge.data.evaluate import caption_batches
from pivotmerge.data.example import IMAGE_TOKEN, SizePreset, build_config, build_processor, write_repo

# Bump when the recipe changes, so cached worlds of the old recipe are not reused. Recipe 2: worlds are built
# on one thread whatever the caller's setting (recipe 1 took the caller's, so `bench quality --threads 2` built
# other worlds than the default; recipe 1 worlds built on one thread are recipe 2's, bit for bit).
RECIPE = 2
# A matmul's float sums depend on how torch splits them over threads; over hundreds of training steps those
# last-bit differences grow into worlds whose merges score a point apart. One thread is also the fastest on
# these tiny models (an expert's training step took 1.3 s with 2 threads against 75 ms with one, on a busy
# 2-core machine).
BUILD_THREADS = 1
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    n_train: int  # images per domain
    n_dev: int
    n_test: int
    n_calib: int  # calibration images per domain (each expert's own domain)
    vision_steps: int
    lm_steps: int
    expert_steps: int  # the joint model trains len(DOMAINS) times as long, on all domains
    lr: float = 3e-3  # peak Adam rate of the projector, in the experts and the joint model
    batch: int = 32
    # The fresh projector as LLaVA's stage 1 makes it: torch's default nn.Linear init (uniform, 1/sqrt(fan_in)),
    # not transformers' 0.02-std normal, so its hidden units start as random features shared by every expert.
    torch_init: bool = True
    vision_layers: int = 2
    text_layers: int = 2
    # The components alignment trains (the spec's component names); the projector always trains.
    trains: tuple[str, ...] = ("projector",)
    # With `vision_tower` in `trains`: how many of the tower's layers train, the top ones that feed the
    # projector (those up to LLaVA's feature layer; the layers above it never reach the output).
    vision_top: int = 2
    body_lr: float = 1e-3  # peak Adam rate of the language model and the tower's layers, where they train

    @property
    def preset(self) -> SizePreset:
        # 32x32 images in 16 patches; a 64-wide tower leaves each domain room for its own feature directions.
        return SizePreset(image_size=32, patch_size=8, vision_hidden=64, vision_layers=self.vision_layers,
                          text_hidden=64, text_layers=self.text_layers, heads=4)

    def merge_components(self) -> list[str]:
        """What a user merges: the components alignment trained, as the spec's `components` names them."""
        return list(self.trains)

    def key(self, seed: int) -> str:
        text = json.dumps({"recipe": RECIPE, "seed": seed, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class World:
    """Where one seed's world lies: model folders and each domain's dataset per split."""

    root: Path
    base: Path
    experts: dict[str, Path]  # domain -> its expert's folder
    joint: Path
    config: Config

    def dataset(self, split: str, domain: str) -> Path:
        return self.root / "data" / split / domain / "data.jsonl"

    def datasets(self, split: str, domains: tuple[str, ...] = DOMAINS) -> list[Dataset]:
        return [load_dataset(self.dataset(split, d), name=d) for d in domains]


def world_at(root: Path, cfg: Config) -> World:
    return World(root=root, base=root / "base", experts={d: root / f"expert_{d}" for d in DOMAINS},
                 joint=root / "joint", config=cfg)


def build_world(cfg: Config, seed: int, cache: Path, progress: Progress = lambda _: None) -> World:
    """The world of `cfg` and `seed`, read from `cache` if built before, else built there."""
    root = cache / f"world-{cfg.key(seed)}"
    if (root / "world.json").is_file():
        return world_at(root, cfg)
    partial = cache / f".partial-{cfg.key(seed)}-{os.getpid()}"  # builders running side by side never share one
    shutil.rmtree(partial, ignore_errors=True)
    with torch_threads(BUILD_THREADS), torch.random.fork_rng(devices=[]):
        _build(cfg, seed, partial, progress)
    (partial / "world.json").write_text(json.dumps({"seed": seed, "config": asdict(cfg), "recipe": RECIPE}, indent=1))
    try:
        partial.rename(root)  # a world appears only when complete
    except OSError:  # another builder finished the same world first: the same bytes, keep theirs
        shutil.rmtree(partial)
    return world_at(root, cfg)


# --------------------------------------------------------------------------- building


def _build(cfg: Config, seed: int, out: Path, progress: Progress) -> None:
    torch.manual_seed(seed)
    sizes = {"train": cfg.n_train, "dev": cfg.n_dev, "test": cfg.n_test, "calib": cfg.n_calib}
    for s, split in enumerate(SPLITS):
        for d, domain in enumerate(DOMAINS):
            write_split(out / "data" / split / domain, domain, sizes[split], seed=[seed, s, d],
                        image_size=cfg.preset.image_size)
    processor = build_processor(cfg.preset)
    tok = processor.tokenizer
    config = build_config(cfg.preset, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    world = world_at(out, cfg)
    train = _TrainData.of(processor, [load_dataset(world.dataset("train", d), name=d) for d in DOMAINS])

    progress("pre-training the vision tower")
    tower = _model(config, seed * 7 + 1)
    _pretrain_vision(tower, train, cfg, seed * 7 + 2)
    progress("pre-training the language model (on another tower, with a throw-away projector)")
    reader = _model(config, seed * 7 + 3)
    _pretrain_vision(reader, train, cfg, seed * 7 + 4)
    _train(reader, train, list(range(train.rows)), cfg.lm_steps, cfg.batch, seed * 7 + 5,
           groups=[{"params": [p for n, p in reader.named_parameters() if "vision_tower" not in n], "lr": 1e-3}])

    # The shared initialisation: the pre-trained tower (trainable again where alignment trains it), a fresh
    # projector, the language model.
    model = _model(config, seed * 7 + 6)
    model.model.vision_tower.load_state_dict(tower.model.vision_tower.state_dict())
    model.model.language_model.load_state_dict(reader.model.language_model.state_dict())
    model.lm_head.load_state_dict(reader.lm_head.state_dict())
    projector = model.model.multi_modal_projector
    if cfg.torch_init:
        for layer in (projector.linear_1, projector.linear_2):
            layer.reset_parameters()
    shared = {k: v.clone() for k, v in model.state_dict().items()}
    write_repo(world.base, config, processor, shared)
    for d, domain in enumerate(DOMAINS):
        progress(f"training the {domain} expert")
        model.load_state_dict(shared)
        _train(model, train, train.rows_of(domain), cfg.expert_steps, cfg.batch, seed * 7 + 100 + d,
               groups=_aligned(model, cfg))
        write_repo(world.experts[domain], config, processor, _state(model))
    progress("training the joint model")
    model.load_state_dict(shared)
    _train(model, train, list(range(train.rows)), len(DOMAINS) * cfg.expert_steps, cfg.batch,
           seed * 7 + 200, groups=_aligned(model, cfg))
    write_repo(world.joint, config, processor, _state(model))


def _aligned(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Adam's parameter groups for what alignment trains: the projector at `lr`, the rest at `body_lr`."""
    inner = model.model
    body: list[nn.Parameter] = []
    if "language_model" in cfg.trains:
        body += [*inner.language_model.parameters(), *model.lm_head.parameters()]
    if "vision_tower" in cfg.trains:
        layers = inner.vision_tower.encoder.layers
        top = len(layers) + 1 + model.config.vision_feature_layer if model.config.vision_feature_layer < 0 \
            else model.config.vision_feature_layer  # hidden state i is layer i's output (0: the embeddings)
        body += [p for layer in layers[max(0, top - cfg.vision_top):top] for p in layer.parameters()]
    groups = [{"params": list(inner.multi_modal_projector.parameters()), "lr": cfg.lr}]
    return groups + ([{"params": body, "lr": cfg.body_lr}] if body else [])


def _model(config: Any, seed: int) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@dataclass
class _TrainData:
    """Every training caption as the evaluator tokenises it (one batch, so rows share padding)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    words: torch.Tensor  # multi-hot caption words, the vision tower's supervised target
    domain_rows: dict[str, list[int]]

    @classmethod
    def of(cls, processor: Any, datasets: list[Dataset]) -> "_TrainData":
        records = [r for d in datasets for r in d.records]
        batch = caption_batches(processor, records, len(records))[0]
        rows, start = {}, 0
        for d in datasets:
            rows[d.name] = list(range(start, start + len(d.records)))
            start += len(d.records)
        vocab = processor.tokenizer.get_vocab()
        words = torch.zeros(len(records), len(vocab))
        for i, r in enumerate(records):
            words[i, [vocab[w] for w in r.caption.split()]] = 1.0
        return cls(batch.inputs, batch.targets, words, rows)

    @property
    def rows(self) -> int:
        return self.targets.shape[0]

    def rows_of(self, domain: str) -> list[int]:
        return self.domain_rows[domain]


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth, then cosine decay to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _batches(rows: list[int], steps: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield torch.as_tensor(rng.choice(rows, size=min(batch, len(rows)), replace=False))


def _image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds the projector: the chosen layer's patch states, CLS left out."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def _pretrain_vision(model: nn.Module, data: _TrainData, cfg: Config, seed: int) -> None:
    """Supervised pre-training of the tower: its patch features, pooled, predict the caption's words."""
    tower = model.model.vision_tower
    head = nn.Linear(model.config.vision_config.hidden_size, data.words.shape[1])
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.vision_steps))
    for rows in _batches(list(range(data.rows)), cfg.vision_steps, 2 * cfg.batch, seed):
        feats = _image_features(model, data.inputs["pixel_values"][rows]).mean(dim=1)
        loss = nn.functional.binary_cross_entropy_with_logits(head(feats), data.words[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tower.requires_grad_(False)


def _train(model: nn.Module, data: _TrainData, rows: list[int], steps: int, batch: int, seed: int,
           groups: list[dict[str, Any]]) -> None:
    """Caption loss on the target tokens (the evaluator's) for Adam's parameter `groups` (params, peak lr).
    A frozen tower's features are computed once; a tower that trains runs on every batch."""
    model.requires_grad_(False)  # gradients only where they are used
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    inner = model.model
    if any(p.requires_grad for p in inner.vision_tower.parameters()):
        def features(idx: torch.Tensor) -> torch.Tensor:
            return _image_features(model, data.inputs["pixel_values"][idx])
    else:
        with torch.no_grad():
            computed = _image_features(model, data.inputs["pixel_values"])

        def features(idx: torch.Tensor) -> torch.Tensor:
            return computed[idx]
    image_token = model.config.image_token_id
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    for idx in _batches(rows, steps, batch, seed):
        ids, mask = data.inputs["input_ids"][idx], data.inputs["attention_mask"][idx]
        embeds = inner.get_input_embeddings()(ids)
        image = inner.multi_modal_projector(features(idx)).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter((ids == image_token)[..., None].expand_as(embeds), image)
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[:, :-1])
        target = data.targets[idx][:, 1:]
        loss = nn.functional.cross_entropy(logits[target], ids[:, 1:][target])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
