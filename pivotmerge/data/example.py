"""Tiny, real LLaVA repos and synthetic image-caption data, made offline.

`make_example` writes a base model (the experts' shared starting point) and K
experts in Hugging Face format: a `transformers` LlavaConfig with a small CLIP
vision tower and a small Llama language model, safetensors weights, a word-level
tokenizer built with `tokenizers` and a CLIP image processor, saved together as a
LlavaProcessor. Each expert is the base plus an update of its projector (and,
with `lm_experts`, of its language-model linear layers): a component shared by
all experts plus one of its own, so merging them is meaningful. Everything is a
function of the seed; the same seed gives byte-identical safetensors.

`make_dataset` renders synthetic domains with numpy/PIL into the JSONL dataset
format that `pivotmerge.data` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " assistant :{% else %} {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 30), "green": (30, 200, 60), "blue": (40, 80, 230),
    "yellow": (240, 220, 30), "purple": (160, 40, 210), "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle")
SIDES = ("left", "right")
ROWS = ("top", "bottom")
NUMBERS = ("one", "two", "three", "four", "five")
ORIENTATIONS = ("horizontal", "vertical")
DOMAINS = ("shapes", "stripes", "dots")

# Every word a caption, question, answer or prompt uses; the tokenizer's vocabulary.
WORDS = sorted(set(
    list(COLOURS) + list(SHAPES) + list(SIDES) + list(ROWS) + list(NUMBERS) + list(ORIENTATIONS)
    + "a an on the at of in with and is are there what which where how many colour shape side "
      "stripes dots describe image user assistant : . ? ,".split()
))


@dataclass(frozen=True)
class SizePreset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int


SIZES: dict[str, SizePreset] = {
    # For tests: a few hundred kB of weights, loads and generates in well under a second.
    "tiny": SizePreset(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                       text_hidden=64, text_layers=2, heads=4),
    # For demos: ~12 MB per model, still CPU-friendly.
    "small": SizePreset(image_size=64, patch_size=8, vision_hidden=128, vision_layers=4,
                        text_hidden=256, text_layers=4, heads=8),
}

PROJECTOR_PREFIX = "model.multi_modal_projector."
LM_LAYER_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class ExampleSet:
    """What `make_example` wrote."""

    root: Path
    base: Path
    experts: list[Path]
    spec: Path
    # Tensor names that differ between the base and each expert.
    perturbed: list[str]
    datasets: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- model


def build_tokenizer():
    """A word-level tokenizer over the synthetic vocabulary, with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
        model_max_length=512,
    )


def build_processor(preset: SizePreset):
    # The PIL backend: the default one needs torchvision, which this project does not install.
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=preset.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(preset: SizePreset, vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=preset.image_size, patch_size=preset.patch_size, hidden_size=preset.vision_hidden,
        intermediate_size=2 * preset.vision_hidden, num_hidden_layers=preset.vision_layers,
        num_attention_heads=max(1, preset.heads // 2), projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=preset.text_hidden, intermediate_size=2 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads // 2, max_position_embeddings=512,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    n_patches = (preset.image_size // preset.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=n_patches, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def _base_state(config, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised LLaVA's weights, as a function of the seed alone."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _randn(shape: torch.Size, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def perturbed_names(state: dict[str, torch.Tensor], lm_experts: bool) -> list[str]:
    """The tensors an expert changes: the projector, and optionally the LM's linear layers."""
    names = [n for n in state if n.startswith(PROJECTOR_PREFIX)]
    if lm_experts:
        names += [n for n in state if ".language_model.layers." in n and n.endswith(".weight")
                  and any(f".{m}." in n for m in LM_LAYER_LINEAR)]
    return sorted(names)


def expert_state(base: dict[str, torch.Tensor], names: list[str], seed: int, expert: int,
                 scale: float = 0.3) -> dict[str, torch.Tensor]:
    """The base plus, on `names`, a shared update and this expert's own.

    Updates are scaled to each tensor's spread so every layer moves by a similar
    relative amount; the shared part is what merging should keep.
    """
    out = dict(base)
    for i, name in enumerate(names):
        w = base[name]
        spread = float(w.float().std()) if w.numel() > 1 and float(w.float().std()) > 0 else 0.02
        shared = _randn(w.shape, seed * 1_000_003 + i)
        own = _randn(w.shape, (seed * 1_000_003 + i) * 101 + expert + 1)
        out[name] = (w.float() + scale * spread * (0.6 * shared + 0.8 * own)).to(w.dtype)
    return out


def write_repo(out: Path, config, processor, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                     pad_token_id=text.pad_token_id).save_pretrained(out)
    # Sorted keys and fixed metadata: the file is a function of the tensors alone.
    save_file({k: state[k] for k in sorted(state)}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_spec(root: Path, base: Path, experts: list[Path], calibration: list[Path] | None = None,
               evaluate: dict[str, Path] | None = None) -> Path:
    """`root/pivotmerge.yaml`: PivotMerge of the experts' projectors at its defaults. `calibration`
    gives each expert its own dataset (so the defaults are the data mode); `evaluate` (name ->
    dataset) scores the merge beside the base and every expert."""
    import yaml

    spec: dict[str, Any] = {
        "method": "pivotmerge",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "components": ["projector"],
    }
    for entry, data in zip(spec["models"], calibration or []):
        entry["calibration"] = {"dataset": str(data)}
    if evaluate:
        spec["evaluate"] = [{"name": name, "dataset": str(data)} for name, data in evaluate.items()]
        spec["evaluate_inputs"] = True
    path = root / "pivotmerge.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def make_example(out_dir: str | Path, n_experts: int = 3, seed: int = 0, lm_experts: bool = False,
                 size: str = "tiny", with_data: bool = False, n_samples: int = 16) -> ExampleSet:
    """Write `base/`, `expert_1..K/`, `pivotmerge.yaml` (and with `with_data`, `data/<domain>/`)."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    if n_experts < 1:
        raise ValueError("n_experts: need at least one expert")
    root = Path(out_dir).resolve()
    preset = SIZES[size]
    processor = build_processor(preset)
    tok = processor.tokenizer
    config = build_config(preset, len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    base_state = _base_state(config, seed)
    names = perturbed_names(base_state, lm_experts)
    base = write_repo(root / "base", config, processor, base_state)
    experts = [write_repo(root / f"expert_{k + 1}", config, processor, expert_state(base_state, names, seed, k))
               for k in range(n_experts)]
    datasets = {}
    if with_data:
        for d, domain in enumerate(DOMAINS):
            datasets[domain] = make_dataset(root / "data" / domain, domain, n_samples, seed + d,
                                            image_size=preset.image_size)
    spec = write_spec(root, base, experts)
    return ExampleSet(root=root, base=base, experts=experts, spec=spec, perturbed=names, datasets=datasets)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    caption: str
    question: str
    answer: str


def _canvas(size: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.random((size, size, 3)) * 40).astype(np.uint8)  # dark, slightly noisy ground


def render_shapes(rng: np.random.Generator, size: int) -> Rendered:
    colour = str(rng.choice(list(COLOURS)))
    shape, side, row = str(rng.choice(SHAPES)), str(rng.choice(SIDES)), str(rng.choice(ROWS))
    img = Image.fromarray(_canvas(size, rng))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    half, pad = size // 2, size // 10
    x0, y0 = (0 if side == "left" else half) + pad, (0 if row == "top" else half) + pad
    x1, y1 = x0 + half - 2 * pad, y0 + half - 2 * pad
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return Rendered(img, f"a {colour} {shape} on the {row} {side}", "what colour is the shape ?", colour)


def render_stripes(rng: np.random.Generator, size: int) -> Rendered:
    colour, orientation = str(rng.choice(list(COLOURS))), str(rng.choice(ORIENTATIONS))
    arr = _canvas(size, rng)
    period = max(2, size // 8)
    band = (np.arange(size) // period) % 2 == 0
    if orientation == "horizontal":
        arr[band, :, :] = COLOURS[colour]
    else:
        arr[:, band, :] = COLOURS[colour]
    return Rendered(Image.fromarray(arr), f"{orientation} {colour} stripes",
                    "which stripes ?", orientation)


def render_dots(rng: np.random.Generator, size: int) -> Rendered:
    colour, n = str(rng.choice(list(COLOURS))), int(rng.integers(1, len(NUMBERS) + 1))
    arr = _canvas(size, rng)
    r = max(1, size // 16)
    cells = rng.choice(16, size=n, replace=False)  # a 4x4 grid keeps dots apart, so they can be counted
    yy, xx = np.mgrid[0:size, 0:size]
    for c in cells:
        cy, cx = (c // 4 + 0.5) * size / 4, (c % 4 + 0.5) * size / 4
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = COLOURS[colour]
    word = NUMBERS[n - 1]
    return Rendered(Image.fromarray(arr), f"{word} {colour} dots", "how many dots are there ?", word)


RENDERERS: dict[str, Callable[[np.random.Generator, int], Rendered]] = {
    "shapes": render_shapes, "stripes": render_stripes, "dots": render_dots,
}


def make_dataset(out_dir: str | Path, domain: str, n: int, seed: int = 0, image_size: int = 32) -> Path:
    """Render `n` samples of a synthetic domain; returns the path of its `data.jsonl`.

    Images go to `images/` beside the JSONL and are referenced relative to it.
    """
    if domain not in RENDERERS:
        raise ValueError(f"domain: expected one of {', '.join(RENDERERS)}, got {domain!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, DOMAINS.index(domain)])
    lines = []
    for i in range(n):
        sample = RENDERERS[domain](rng, image_size)
        rel = f"images/{domain}_{i:05d}.png"
        sample.image.save(out / rel)
        lines.append(json.dumps({"image": rel, "caption": sample.caption,
                                 "question": sample.question, "answer": sample.answer}))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
