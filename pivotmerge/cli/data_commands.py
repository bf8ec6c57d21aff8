"""The data commands: make-example (tiny models and datasets made offline) and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from pivotmerge.data.example import DOMAINS, SIZES


@click.command("make-example")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--experts", "n_experts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of expert models to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed writes identical weights.")
@click.option("--lm-experts", is_flag=True, help="Experts also update the language model's linear layers.")
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True,
              help="tiny: for tests (under 1 MB); small: for demos (~12 MB each).")
@click.option("--data", "with_data", is_flag=True,
              help=f"Also render synthetic image-caption datasets ({', '.join(DOMAINS)}) under OUT_DIR/data.")
@click.option("--samples", "n_samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Samples per dataset with --data.")
def make_example_command(out_dir: Path, n_experts: int, seed: int, lm_experts: bool, size: str,
                         with_data: bool, n_samples: int) -> None:
    """Write a tiny LLaVA base model and experts to merge, made offline.

    OUT_DIR gets base/ (the experts' shared starting point), expert_1/ ...
    expert_K/ (the base with an updated projector), each a Hugging Face folder
    that transformers loads, and pivotmerge.yaml, a spec merging the experts'
    projectors with PivotMerge:

    \b
        pivotmerge make-example demo --data
        pivotmerge merge demo/pivotmerge.yaml -o merged
    """
    from pivotmerge.data.example import make_example

    ex = make_example(out_dir, n_experts=n_experts, seed=seed, lm_experts=lm_experts, size=size,
                      with_data=with_data, n_samples=n_samples)
    click.echo(f"base:    {ex.base}")
    for e in ex.experts:
        click.echo(f"expert:  {e}")
    for domain, path in ex.datasets.items():
        click.echo(f"data:    {path}  ({domain})")
    click.echo(f"spec:    {ex.spec}")
    click.echo(f"next:    pivotmerge merge {ex.spec} -o merged")


def _prompt_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The spec's own check of a prompt format (DatasetRef.prompt), as a one-line usage error."""
    from pydantic import ValidationError

    from pivotmerge.spec.schema import DatasetRef

    try:
        return DatasetRef(dataset="-", prompt=value).prompt
    except ValidationError as exc:
        raise click.BadParameter(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None


@click.command("evaluate")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A JSONL file, a parquet file or a `datasets` folder (image, caption, optional question/answer); "
                   "repeat for several.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many records per dataset.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Longest greedy answer generated for questions.")
@click.option("--prompt", default="plain", show_default=True, callback=_prompt_format,
              help="What precedes each caption: plain (image tokens), chat (the processor's chat template with an "
                   "instruction), or a template with {image} and optionally {instruction}.")
@click.option("--image-column", default="image", show_default=True, help="Parquet / datasets column holding the image.")
@click.option("--caption-column", default="caption", show_default=True, help="Parquet / datasets column holding the caption.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of a table.")
def evaluate_command(model: Path, data: tuple[Path, ...], limit: int | None, device: str, batch_size: int,
                     max_new_tokens: int, prompt: str, image_column: str, caption_column: str, as_json: bool) -> None:
    """Evaluate a LLaVA-style MODEL folder on image-caption datasets.

    Prints, per dataset, the caption loss and perplexity, next-token accuracy on
    caption tokens, and question-answer exact match where records have answers.

    \b
        pivotmerge evaluate merged --data demo/data/shapes/data.jsonl --data demo/data/dots/data.jsonl
    """
    from transformers.utils import logging as hf_logging

    from pivotmerge.data.datasets import load_dataset
    from pivotmerge.data.evaluate import evaluate_model, metrics_table

    hf_logging.disable_progress_bar()  # the table is the output; loading bars would interleave with it
    datasets = [load_dataset(d, limit=limit, prompt=prompt, image_column=image_column, caption_column=caption_column)
                for d in data]
    results = {model.name: evaluate_model(model, datasets, device=device, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens)}
    if as_json:
        click.echo(json.dumps({label: [m.model_dump(mode="json") for m in metrics] for label, metrics in results.items()},
                              indent=2))
    else:
        Console().print(metrics_table(results))
