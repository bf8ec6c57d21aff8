"""The data commands: make-example (tiny models, or trained ones with their data, made offline) and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from pivotmerge.bench import CACHE
from pivotmerge.bench.domains import DOMAINS
from pivotmerge.data.example import SIZES
from pivotmerge.errors import PivotMergeError


@click.command("make-example")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "with_data", is_flag=True,
              help=f"Write the trained example instead: one expert per domain ({', '.join(DOMAINS)}) whose "
                   "projector learned that domain, the domains' train/dev/test/calib data, and a spec that merges "
                   "the experts with calibration data and scores the merge beside every input on the test data. "
                   "About a minute to build the first time, then read from --cache.")
@click.option("--experts", "n_experts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of expert models to write (not with --data).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; the same seed writes identical weights.")
@click.option("--lm-experts", is_flag=True, help="Experts also update the language model's linear layers (not with --data).")
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True,
              help="tiny: for tests (under 1 MB); small: for demos (~12 MB each) (not with --data).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=CACHE, show_default=True,
              help="With --data: where the trained example is kept after its first build (shared with `pivotmerge bench`).")
@click.option("--force", is_flag=True, help="Write into OUT_DIR even if it is not empty (replacing the example's files).")
@click.pass_context
def make_example_command(ctx: click.Context, out_dir: Path, with_data: bool, n_experts: int, seed: int,
                         lm_experts: bool, size: str, cache: Path, force: bool) -> None:
    """Write a tiny LLaVA base model and experts to merge, made offline.

    OUT_DIR gets base/ (the experts' shared starting point), the experts (each a
    Hugging Face folder that transformers loads) and pivotmerge.yaml, a spec
    merging the experts' projectors with PivotMerge. Without --data the experts
    (expert_1/ ... expert_K/) are the base plus random projector updates: quick to
    make, and they merge, but they learned nothing. With --data they are trained,
    one per domain (expert_<domain>/), and the merge shows what merging buys:

    \b
        pivotmerge make-example demo --data
        pivotmerge merge demo/pivotmerge.yaml -o merged
    """
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise PivotMergeError(f"{out_dir} exists and is not empty; choose another folder, or --force to write into it")
    if with_data:
        from click.core import ParameterSource

        from pivotmerge.bench.trained_example import make_trained_example

        for name in ("n_experts", "lm_experts", "size"):
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
                option = next(p for p in ctx.command.params if p.name == name).opts[0]
                raise PivotMergeError(f"{option}: does not apply with --data (the trained example has one expert per "
                                      f"domain: {', '.join(DOMAINS)})")
        ex = make_trained_example(out_dir, cache, seed=seed, progress=lambda message: click.echo(message, err=True))
    else:
        from pivotmerge.data.example import make_example

        ex = make_example(out_dir, n_experts=n_experts, seed=seed, lm_experts=lm_experts, size=size)
    click.echo(f"base:    {ex.base}")
    for e in ex.experts:
        click.echo(f"expert:  {e}")
    for domain, path in ex.datasets.items():
        click.echo(f"test:    {path}  ({domain}; dev, calib and train beside it)")
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
        pivotmerge evaluate merged --data demo/data/test/shapes/data.jsonl --data demo/data/test/dots/data.jsonl
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
