"""`pivotmerge bench`: benchmark commands (quality here; others may join the group)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click


@click.group()
def bench() -> None:
    """Benchmarks of the merge methods."""


@bench.command()
@click.option("--quick", is_flag=True, help="Small configuration for CI (about 2 minutes on 2 CPU cores).")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Number of seeds (default: 1 quick, 3 full).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-quality"),
              show_default=True, help="Folder for results.md, results.json, raw_scores.json and the plot.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch CPU threads.")
def quality(quick: bool, seeds: int | None, out: Path, threads: int) -> None:
    """Merge quality on the synthetic heterogeneous post-alignment suite."""
    from rich.console import Console

    from pivotmerge.bench.quality import FULL, QUICK, run

    cfg = QUICK if quick else FULL
    if seeds is not None:
        cfg = replace(cfg, seeds=seeds)
    console = Console(stderr=True)
    with console.status("starting") as status:
        # A spinner on a terminal; timestamped lines in logs (nohup, CI), where a spinner shows nothing.
        show = status.update if console.is_terminal else lambda message: console.print(
            f"{time.strftime('%H:%M:%S')} {message}", highlight=False)
        result = run(cfg, out, show, threads)
    avg = result["table"]
    console.print(f"done in {result['seconds']:.0f}s; wrote {out}/results.md")
    for name, row in avg.items():
        console.print(f"  {name:45s} token accuracy {row['average']['token_accuracy']['mean']:.3f}")
