"""`pivotmerge tune`: search methods and parameters on dev data, write the best trial's merge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from pivotmerge.cli.progress_bar import LazyBar, console
from pivotmerge.errors import PivotMergeError

if TYPE_CHECKING:
    from pivotmerge.tune.trials import Objective
from pivotmerge.report.study import TrialRecord

TUNE_HINT = "pivotmerge tune needs optuna; install it with: pip install 'pivotmerge[tune]'"


def _refs(paths: tuple[Path, ...]) -> list:
    from pivotmerge.spec.schema import DatasetRef

    return [DatasetRef(dataset=str(p.expanduser().resolve())) for p in paths]


def _methods(values: tuple[str, ...]) -> list[str]:
    """`--methods a,b --methods c` -> [a, b, c]."""
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


class TrialBar(LazyBar):
    """Trials done out of the budget, with the best dev objective so far; it appears when the study starts."""

    def __init__(self, objective: str) -> None:
        super().__init__("tuning")
        self._objective = objective
        self._best: float | None = None

    def start(self, budget: int) -> None:
        self._bar.update(self._task, total=budget)
        self._show()

    def advance(self, record: TrialRecord) -> None:
        if record.objective is not None:
            pick = min if self._objective == "loss" else max
            self._best = record.objective if self._best is None else pick(self._best, record.objective)
        best = "" if self._best is None else f"; best dev {self._objective} {self._best:.4f}"
        self._bar.update(self._task, advance=1, note=f"{record.label}: {record.state}{best}")


@click.command("tune")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dev", "dev", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A JSONL dev dataset; the only data that chooses. Repeat for several (required).")
@click.option("--methods", "methods", multiple=True,
              help="Candidates to search, comma-separated or repeated: method names, or labels of the spec's "
                   "tune.space. Default: the tune.space's candidates, else the spec's method.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trial budget. A discrete space of at most 256 settings runs as a grid, in order, up to this many.")
@click.option("--objective", type=click.Choice(["loss", "accuracy", "qa"]), default="accuracy", show_default=True,
              help="Mean over the dev sets of the caption loss (lower), token accuracy or QA exact match (higher).")
@click.option("--test", "test", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A JSONL test dataset, scored once for the chosen trial only; repeat for several.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget in seconds: no trial starts after it (the first always runs).")
@click.option("--seed", type=int, default=None, help="Sampler seed (default: the spec's seed).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch CPU threads: small models evaluate fastest on one (benchmarks/tune_speed.py).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for the best trial's merge; created when the study completes.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the merge report (with the study) as JSON on stdout.")
def tune_command(spec_file: Path, dev: tuple[Path, ...], methods: tuple[str, ...], trials: int, objective: Objective,
                 test: tuple[Path, ...], timeout_s: float | None, seed: int | None, threads: int, out_dir: Path,
                 force: bool,
                 as_json: bool) -> None:
    """Search merge methods and their parameters on dev data; write the best trial's merge to OUT.

    SPEC is a merge spec (the models, base and components to merge) with an optional `tune`
    section narrowing or fixing each candidate's search space (docs/tuning.md). Each trial
    merges in memory and scores the merge on the --dev sets; every trial is recorded in
    OUT/merge_report.json under `study`, plotted in OUT/study.png. --test sets are scored once,
    for the chosen trial, beside its dev score: they never choose.

    \b
        pivotmerge make-example demo --data
        pivotmerge tune demo/pivotmerge.yaml --dev demo/data/dev/shapes/data.jsonl \\
            --methods task_arithmetic,ties,tsv,iso_c,pivotmerge --trials 30 -o tuned
    """
    if not dev:
        raise PivotMergeError("--dev: give at least one dev dataset")
    if importlib.util.find_spec("optuna") is None:
        raise PivotMergeError(TUNE_HINT)
    import torch
    from transformers.utils import logging as hf_logging

    from pivotmerge.tune.study import top_trials
    from pivotmerge.tune.tuning import PLOT_FILE, load_tuning_spec, tune

    hf_logging.disable_progress_bar()  # one bar: the trials'
    torch.set_num_threads(threads)
    spec, section = load_tuning_spec(spec_file)
    with TrialBar(objective) as bar:
        report = tune(spec, section, _refs(dev), out_dir, methods=_methods(methods), trials=trials,
                      objective=objective, test=_refs(test), seed=seed, timeout_s=timeout_s, on_start=bar.start,
                      on_trial=bar.advance, relative_to=spec_file.parent, overwrite=force)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    study = report.study
    assert study is not None  # tune always records it
    table = Table(title=f"best trials of {len(study.trials)} ({study.sampler}, dev {study.objective}, "
                        f"{study.direction}); {sum(t.state == 'failed' for t in study.trials)} failed")
    for col in ("trial", "candidate", "parameters", f"dev {objective}", "seconds"):
        table.add_column(col, justify="right" if col in ("trial", "seconds", f"dev {objective}") else "left")
    for t in top_trials(study):
        table.add_row(str(t.number), t.label, _params_text(t.params), f"{t.objective:.4f}", f"{t.seconds:.2f}",
                      style="bold" if t.number == study.best else None)
    Console().print(table)
    chosen = study.best_trial()
    console.print(f"[green]chose[/] trial {chosen.number} ({chosen.label}) on dev {objective} {chosen.objective:.4f} "
                  f"-> {out_dir} (plot: {out_dir / PLOT_FILE})")
    if study.best_test:
        from pivotmerge.tune.trials import objective_value

        value = objective_value(study.best_test, study.objective)
        console.print(f"test {objective} of the chosen trial: {value:.4f} (reported, never used to choose)")
