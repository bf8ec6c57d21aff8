"""Evaluate LLaVA-style model folders on image-text datasets.

Models load through the real path (`LlavaForConditionalGeneration` and
`AutoProcessor`, safetensors only). Per dataset:

* caption loss: mean negative log-likelihood of the caption tokens (and the end
  of sequence) after the captioning prompt, averaged over tokens;
* perplexity: exp(caption loss);
* token accuracy: share of those tokens that are the model's argmax prediction;
* exact match: share of questions whose greedy answer equals the reference
  (case, surrounding spaces and punctuation ignored), where answers exist.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from pivotmerge.data.datasets import CAPTION_PROMPT, Dataset, Record, load_image, load_ref
from pivotmerge.plan.device import resolve_device
from pivotmerge.errors import MergeCancelled, PivotMergeError
from pivotmerge.progress import CancelFn, Progress, ProgressFn
from pivotmerge.spec.schema import DatasetRef


class DatasetMetrics(BaseModel):
    """One model's metrics on one dataset."""

    # NaN (no caption tokens) is written as JSON's NaN, as json.dumps does.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    dataset: str
    samples: int
    tokens: int
    caption_loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float | None  # None when no record has an answer
    questions: int
    prompt: str  # the caption prompt format the scores were measured with (DatasetRef.prompt)


Evaluation = dict[str, list[DatasetMetrics]]  # model label -> its metrics, one entry per dataset


@dataclass
class Loaded:
    model: Any  # an AutoModelForImageTextToText model of any supported family
    processor: Any
    device: torch.device


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Without transformers' own progress bars ("Loading weights"): they would cut through ours, and a
    Celery worker logs what a bar writes to stderr as WARNING lines."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_model(model_dir: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32) -> Loaded:
    """A model folder loaded for inference; pickled weights are never read."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(model_dir)
    if not any(path.glob("*.safetensors")):
        raise PivotMergeError(f"{path}: no safetensors weights (pickled weights are never loaded)")
    dev = resolve_device(device)
    with no_transformers_bars():
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_safetensors=True)
        model = model.to(dev).eval()  # type: ignore[arg-type]  # transformers types .to() for a dtype only
        return Loaded(model, AutoProcessor.from_pretrained(path), dev)


def image_placeholder(processor: Any) -> str:
    """What stands for one image in a prompt, for the processor to expand into the family's image tokens."""
    vocab = processor.tokenizer.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # Qwen2-VL and successors frame their image pads
        return f"<|vision_start|>{processor.image_token}<|vision_end|>"
    return processor.image_token  # Gemma 3's is its begin-of-image token, InternVL's its context token


def caption_prompt(processor: Any, prompt: str) -> str:
    """What precedes a caption: `plain` image tokens (how post-alignment models were trained), `chat`
    (the processor's chat template with the caption instruction), or a template with `{image}`
    (and optionally `{instruction}`)."""
    if prompt == "plain":
        return image_placeholder(processor)
    if prompt == "chat":
        if not getattr(processor, "chat_template", None):
            raise PivotMergeError("prompt: chat needs a processor with a chat template; "
                                  "this model has none (use plain)")
        return prompt_for(processor, CAPTION_PROMPT)
    return prompt.format(image=image_placeholder(processor), instruction=CAPTION_PROMPT)


def prompt_for(processor: Any, text: str) -> str:
    """The user turn holding the image and `text`, ready for the answer (chat template if any)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{image_placeholder(processor)}\n{text}"


# ----------------------------------------------------------------- caption scores


@dataclass
class CaptionBatch:
    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor  # bool [batch, seq]: token i is a caption token to predict


def target_mask(attention_mask: torch.Tensor, n_targets: torch.Tensor) -> torch.Tensor:
    """True on the last `n_targets[b]` attended tokens of each row, whichever side pads."""
    from_right = attention_mask.flip(1).cumsum(1).flip(1)  # attended tokens at or after position i
    return (attention_mask == 1) & (from_right <= n_targets[:, None])


def caption_batches(processor: Any, records: Sequence[Record], batch_size: int,
                    prompt: str = "plain") -> list[CaptionBatch]:
    """Tokenised prompt (`caption_prompt`) + caption + end of sequence, with the caption tokens marked."""
    tok = processor.tokenizer
    prompt = caption_prompt(processor, prompt)
    n_prompt = len(tok(prompt)["input_ids"])
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        texts = [f"{prompt} {r.caption}{tok.eos_token}" for r in chunk]
        # The image token is not expanded here, so the difference counts caption tokens only.
        n_targets = torch.tensor([len(tok(t)["input_ids"]) - n_prompt for t in texts])
        inputs = processor(images=[[load_image(r.image)] for r in chunk], text=texts, padding=True, return_tensors="pt")
        batches.append(CaptionBatch(dict(inputs), target_mask(inputs["attention_mask"], n_targets)))
    return batches


@dataclass(frozen=True)
class TokenStats:
    nll: float  # summed over target tokens
    correct: int
    tokens: int

    def __add__(self, other: "TokenStats") -> "TokenStats":
        return TokenStats(self.nll + other.nll, self.correct + other.correct, self.tokens + other.tokens)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")


def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Next-token NLL and argmax hits on the marked tokens (position i predicts token i+1)."""
    pred_logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = targets[:, 1:]
    logp = torch.log_softmax(pred_logits[mask], dim=-1)
    gold = labels[mask]
    nll = -logp.gather(1, gold[:, None]).sum()
    correct = (logp.argmax(-1) == gold).sum()
    return TokenStats(float(nll.double()), int(correct), int(mask.sum()))


@torch.no_grad()
def caption_stats(model: Any, batches: Sequence[CaptionBatch], device: torch.device) -> TokenStats:
    total = TokenStats(0.0, 0, 0)
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        logits = model(**inputs).logits
        total = total + token_stats(logits, inputs["input_ids"], batch.targets.to(device))
    return total


# ----------------------------------------------------------------- question answering


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no punctuation at either end."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


@torch.no_grad()
def answers(loaded: Loaded, records: Sequence[Record], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to the records' questions."""
    processor, tok = loaded.processor, loaded.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # generation continues every row at its end
    try:
        out = []
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            inputs = processor(images=[[load_image(r.image)] for r in chunk],
                               text=[prompt_for(processor, r.question or "") for r in chunk],
                               padding=True, return_tensors="pt").to(loaded.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
            inputs.pop("token_type_ids", None)  # PaliGemma's marks prefix and suffix for training; generate takes none
            generated = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return out
    finally:
        tok.padding_side = side


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


# ----------------------------------------------------------------- drivers


def perplexity(loss: float) -> float:
    """exp(loss), infinite where it overflows a float (a loss above about 709 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_loaded(loaded: Loaded, dataset: Dataset, batch_size: int = 8, max_new_tokens: int = 8) -> DatasetMetrics:
    stats = caption_stats(loaded.model, caption_batches(loaded.processor, dataset.records, batch_size, dataset.prompt),
                          loaded.device)
    qa = [r for r in dataset.records if r.answer is not None]
    em = exact_match(answers(loaded, qa, batch_size, max_new_tokens), [r.answer or "" for r in qa]) if qa else None
    return DatasetMetrics(dataset=dataset.name, samples=len(dataset.records), tokens=stats.tokens,
                          caption_loss=stats.loss, perplexity=perplexity(stats.loss), token_accuracy=stats.accuracy,
                          exact_match=em, questions=len(qa), prompt=dataset.prompt)


def evaluate_model(model_dir: str | Path, datasets: Sequence[Dataset], *, device: str = "auto",
                   batch_size: int = 8, max_new_tokens: int = 8) -> list[DatasetMetrics]:
    loaded = load_model(model_dir, device)
    return [evaluate_loaded(loaded, d, batch_size, max_new_tokens) for d in datasets]


def evaluate_models(models: Mapping[str, str | Path], datasets: Sequence[Dataset], *, device: str = "auto",
                    batch_size: int = 8, max_new_tokens: int = 8) -> Evaluation:
    """Side-by-side metrics, e.g. {"merged": ..., "base": ..., "expert_1": ...}, one model loaded at a time."""
    return {label: evaluate_model(path, datasets, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens)
            for label, path in models.items()}


def metrics_table(results: Evaluation):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title="Evaluation")
    for col in ("model", "dataset", "samples", "caption loss", "perplexity", "token acc", "exact match"):
        table.add_column(col, justify="left" if col in ("model", "dataset") else "right")
    for label, metrics in results.items():
        for m in metrics:
            em = "-" if m.exact_match is None else f"{m.exact_match:.3f} ({m.questions})"
            table.add_row(label, m.dataset, str(m.samples), f"{m.caption_loss:.4f}", f"{m.perplexity:.2f}",
                          f"{m.token_accuracy:.3f}", em)
    return table


# ----------------------------------------------------------------- engine hook


def evaluation_data(refs: Sequence[DatasetRef], *, allowed_roots: Sequence[Path] | None = None,
                    relative_to: Path | None = None) -> list[Dataset]:
    """The spec's `evaluate` datasets, checked before a merge starts so a bad file fails fast."""
    return [load_ref(r, allowed_roots=allowed_roots, relative_to=relative_to) for r in refs]


def evaluate_merge(models: Mapping[str, str | Path], datasets: Sequence[Dataset], device: torch.device, *,
                   progress: ProgressFn | None = None, should_cancel: CancelFn | None = None) -> Evaluation:
    """Metrics of the merged model (and any inputs listed beside it), for the merge report."""
    results = {}
    for i, (label, path) in enumerate(models.items()):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("merge cancelled")
        if progress is not None:
            progress(Progress("evaluate", i, len(models), message=label))
        results[label] = evaluate_model(path, datasets, device=device.type)
    if progress is not None:
        progress(Progress("evaluate", len(models), len(models)))
    return results
