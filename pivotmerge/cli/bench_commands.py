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
              help="Where built worlds are kept, keyed by their config and seed.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
def quality(suite: str, quick: bool, seeds: int | None, out: Path, cache: Path, threads: int) -> None:
    """Merge quality on real LLaVA folders, merged by `pivotmerge.merge`, scored by the evaluator."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from pivotmerge.bench.quality import SUITES, run, with_seeds

    hf_logging.disable_progress_bar()  # hundreds of model loads; their bars would drown the log
    quick_suite, full_suite = SUITES[suite]
    chosen = with_seeds(quick_suite if quick else full_suite, seeds)
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
