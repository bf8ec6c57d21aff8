"""`pivotmerge bench`: benchmark commands (quality here; others may join the group)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pivotmerge.bench import CACHE


@click.group()
def bench() -> None:
    """Benchmarks of the merge methods."""


@bench.command()
@click.option("--suite", type=click.Choice(["projector", "deep"]), default="projector", show_default=True,
              help="projector: alignment trained the projector alone; deep: also the language model and the "
                   "vision tower's top layers, so a merge spans every layer (docs/results.md).")
@click.option("--quick", is_flag=True, help="One seed of a smaller world and the gate rows, for CI (a few minutes on 2 CPU cores).")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Number of seeds (default: 1 quick, 5 full).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-quality"),
              show_default=True, help="Folder for results.md, results.json, raw_scores.json and the plot.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              default=CACHE, show_default=True,
              help="Where built worlds are kept, keyed by their config, seed and recipe.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads for merging and scoring (worlds are always built on one thread, so they "
                   "do not depend on it).")
@click.option("--rows", default=None, metavar="NAME[,NAME...]",
              help="Merge only these rows (tuned and defaults rows of these names; the reference rows are always "
                   "scored; the merge-success scenarios are left out).")
def quality(suite: str, quick: bool, seeds: int | None, out: Path, cache: Path, threads: int, rows: str | None) -> None:
    """Merge quality on real LLaVA folders, merged by `pivotmerge.merge`, scored by the evaluator."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from pivotmerge.bench.quality import SUITES, run, with_rows, with_seeds

    hf_logging.disable_progress_bar()  # hundreds of model loads; their bars would drown the log
    quick_suite, full_suite = SUITES[suite]
    try:
        chosen = with_rows(with_seeds(quick_suite if quick else full_suite, seeds),
                           None if rows is None else tuple(r.strip() for r in rows.split(",") if r.strip()))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console(stderr=True)
    with console.status("starting") as status:
        # A spinner on a terminal; timestamped lines in logs (nohup, CI), where a spinner shows nothing.
        show = status.update if console.is_terminal else lambda message: console.print(
            f"{time.strftime('%H:%M:%S')} {message}", highlight=False)
        result = run(chosen, out, cache, show, threads)
    console.print(f"done in {result['seconds']:.0f}s; wrote {out}/results.md")
    for section in ("reference", "tuned", "defaults"):
        for name, row in result[section].items():
            console.print(f"  {section:9s} {name:36s} token accuracy {row['average']['token_accuracy']['mean']:.3f}")


@bench.command()
@click.option("--quick", is_flag=True, help="Three seed lengths and shorter training, for CI (a few minutes on 2 CPU cores).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-modality"),
              show_default=True, help="Folder for results.md, results.json, modality.png and the models.")
def modality(quick: bool, out: Path) -> None:
    """Sung et al.'s study: fold a modality-specific VL transformer after seed pre-training of growing length.

    It trains every model it scores, on one torch thread (on more, its scores depend on the thread count)."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from pivotmerge.bench.modality import FULL, QUICK, run

    hf_logging.disable_progress_bar()
    console = Console(stderr=True)
    result = run(QUICK if quick else FULL, out, lambda m: console.print(f"{time.strftime('%H:%M:%S')} {m}", highlight=False))
    console.print(f"done in {result['seconds']:.0f}s; wrote {out}/results.md")
    best = result["findings"].get("best_metric")
    if best:
        console.print(f"  best predictor: {best['metric']} (Spearman {best['spearman']})")
