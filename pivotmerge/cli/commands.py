"""The engine's commands: merge, methods, analyze, fold.

What needs torch (methods, specs, the engine) is imported inside each command, so
that listing commands and `--help` do not wait for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from pivotmerge.cli.progress_bar import ProgressBar, console

if TYPE_CHECKING:
    from pivotmerge.methods import Search

@click.command("merge")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; created when the merge completes.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), help="Override the spec's device.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
@click.option("--allow-downloads", is_flag=True, help="Download hub ids missing from the Hugging Face cache.")
def merge_command(spec_file: Path, out_dir: Path, force: bool, device: str | None, as_json: bool,
                  allow_downloads: bool) -> None:
    """Merge the models a SPEC names into OUT.

    SPEC is a YAML merge spec (see `pivotmerge methods` for methods and their
    parameters) or a mergekit config. Relative model paths are read from the
    spec file's folder. OUT holds sharded safetensors, the base's config,
    tokenizer and processor files, merge_report.json and a model card. When
    the spec lists `evaluate` datasets, the metrics are printed as a table
    (with `evaluate_inputs: true`, the base and each expert beside the merge).
    """
    from pivotmerge.run.engine import merge
    from pivotmerge.spec.schema import load_spec

    spec = load_spec(spec_file)
    if device:
        spec = spec.model_copy(update={"device": device})
    with ProgressBar(f"merging ({spec.method})") as bar:
        report = merge(spec, out_dir, progress=bar, relative_to=spec_file.parent, overwrite=force,
                       allow_downloads=allow_downloads)
    # With huggingface_hub's own token (HF_TOKEN or `hf auth login`), as `pivotmerge push`.
    if spec.push_to_hub is not None:
        from pivotmerge.repos.hub import push

        info = push(out_dir, spec.push_to_hub.repo_id, token=None, private=spec.push_to_hub.private)
        console.print(f"pushed {out_dir} to {info.commit_url}")
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    console.print(f"[green]merged[/] {report.tensors.merged} of {report.tensors.total} tensors "
                  f"with {report.method} in {report.timings.total_s:.2f} s on {report.device} -> {out_dir}")
    if report.evaluation is not None:
        from pivotmerge.data.evaluate import metrics_table

        Console().print(metrics_table(report.evaluation))


def _type_name(annotation: Any) -> str:
    args = get_args(annotation)
    if args:
        if type(None) in args and len(args) == 2:
            return _type_name(args[0]) + "?"
        return " | ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


@click.command("methods")
@click.argument("names", metavar="[NAME]...", nargs=-1)
@click.option("--verbose", "-v", is_flag=True, help="Every method's parameters (as naming methods does).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods_command(names: tuple[str, ...], verbose: bool, as_json: bool) -> None:
    """List the merge methods, one line each; NAME (or --verbose) shows their parameters."""
    from pivotmerge.methods import all_methods
    from pivotmerge.methods.description import describe

    methods = all_methods()
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise click.UsageError(f"unknown method {unknown[0]!r}; `pivotmerge methods` lists them")
    if names:
        methods = {n: methods[n] for n in names}
    if as_json:  # the body of GET /v1/methods
        click.echo(json.dumps({"methods": [describe(m).model_dump(mode="json") for m in methods.values()]}, indent=2))
        return
    out = Console()
    if not (names or verbose):
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column("method", no_wrap=True, style="bold")
        table.add_column("summary")
        for name, m in methods.items():
            table.add_row(name, m.summary)
        out.print(table)
        out.print("\n`pivotmerge methods NAME` (or --verbose) shows the parameters, their defaults and ranges.")
        return
    for name, m in methods.items():
        _print_method(out, name, m)


def _print_method(out: Console, name: str, m: Any) -> None:
    """One method's parameters as an indented list: whole names, and lines wrapped to the terminal."""
    def line(markup: str, indent: int) -> None:
        out.print(Padding(Text.from_markup(markup), (0, 0, 0, indent)))

    models = f"{m.min_models}" + ("" if m.max_models == m.min_models else f"..{m.max_models or 'n'}")
    with_data = "; 'with data': the default when the spec gives calibration data" if m.with_calibration else ""
    line(f"[bold]{name}[/] — {escape(m.summary)}", 0)
    line(f"base_model: {m.base}; models: {models}{with_data}", 2)
    old_names: dict[str, list[str]] = {}
    for old, new in m.aliases().items():
        if old != new:
            old_names.setdefault(new, []).append(old)
    for pname, field in m.params.model_fields.items():
        per = " (per model)" if pname in m.per_model else ""
        default = f"default {field.default!r}" + (
            f", with data: {m.with_calibration[pname]!r}" if pname in m.with_calibration else "")
        search = _search_text(m.search_space.get(pname))
        facts = "; ".join(filter(None, [_type_name(field.annotation), default, search and f"search {search}"]))
        line(f"[bold]{pname}[/]{per}: {escape(facts)}", 2)
        also = f" (also: {', '.join(old_names[pname])})" if pname in old_names else ""
        if field.description or also:
            line(escape((field.description or "") + also), 6)
    for need in m.engine_params:
        line(f"[bold]{need}[/] (set by the engine): measured on the spec's calibration data when the parameters "
             "need it; never set in a spec", 2)
    out.print()


def _search_text(search: Search | None) -> str:
    if search is None:
        return ""
    if search.choices is not None:
        return " | ".join(map(str, search.choices))
    return f"{search.low:g}..{search.high:g}" + (" (log)" if search.log else "")


METRIC_LABELS = {"l2": "L2", "relative_l2": "rel L2", "cosine": "cos", "sign_dissimilarity": "sign dis",
                 "soft_sign_dissimilarity": "soft sign", "truncated_sign_dissimilarity": "trunc sign"}


@click.command("analyze")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of tables.")
def analyze_command(spec_file: Path, as_json: bool) -> None:
    """Weight-distance metrics between the models of SPEC, per layer and in total.

    Compares the tensors SPEC would merge: their task vectors (W - base) when
    SPEC has a base_model, else the weights; each metric is averaged over all
    pairs of models. Higher distance and sign dissimilarity predict a harder
    merge (docs/metrics.md defines each metric). Given a fold spec (`model:`,
    see `pivotmerge fold`), compares the modality experts it would fold.
    """
    from pivotmerge.spec.schema import read_yaml

    data = read_yaml(spec_file)
    with ProgressBar("analyzing") as bar:
        if isinstance(data, dict) and "model" in data and "models" not in data:
            from pivotmerge.fold.distances import fold_distances

            result = fold_distances(data, progress=bar, relative_to=spec_file.parent)
        else:
            from pivotmerge.analysis.analyze import analyze
            from pivotmerge.spec.schema import spec_from_dict

            result = analyze(spec_from_dict(data), progress=bar, relative_to=spec_file.parent)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = {**result["layers"], "TOTAL": result["total"]}
    metrics = list(result["total"])
    table = Table(title=f"{len(result['models'])} models, {result['compared']}, {result['tensors']} tensors")
    table.add_column("layer", no_wrap=True)
    for m in metrics:
        table.add_column(METRIC_LABELS.get(m, m), justify="right")
    for layer, values in rows.items():
        table.add_row(layer, *(f"{values[m]:.4g}" for m in metrics), style="bold" if layer == "TOTAL" else None)
    Console().print(table)


@click.command("fold")
@click.argument("spec_file", metavar="FOLD_SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder; created when the fold completes.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
def fold_command(spec_file: Path, out_dir: Path, force: bool, as_json: bool) -> None:
    """Fold one model's modality-specific parameter groups into one shared group.

    FOLD_SPEC is YAML naming the model (relative paths are read from the spec's
    folder), the fold method and a name map per modality: tensors whose names,
    rewritten by their modality's pattern/replace, agree fold into that name.

    \b
        model: vlmo-like
        method: modality_arithmetic      # or interpolation, regmean
        lambda: 0.5                      # W0 + lambda * sum_m (W_m - W0)
        groups:
          vision: {pattern: '\\.mlp\\.vision\\.', replace: '.mlp.'}
          text:   {pattern: '\\.mlp\\.text\\.',   replace: '.mlp.'}
        w0_model: pretrained             # optional; default: the model's own W0 tensors

    interpolation takes `weights` per modality; regmean takes `alpha` and a
    `calibration` dataset (LLaVA-style models) or `calibration_inputs`, one or
    more safetensors files of forward-pass arguments run through the model's own
    routed forward pass (any AutoModel). For a model with a folding table (the
    project's modality-specific VL transformer) `groups` may be left out: the
    table's maps are used and OUT loads as the shared model (docs/folding.md).
    OUT holds sharded safetensors, the model's config and tokenizer files,
    fold_report.json and a model card (docs/evaluation.md).
    """
    from pivotmerge.fold.fold_repo import fold, fold_spec_from_dict
    from pivotmerge.spec.schema import read_yaml

    spec = fold_spec_from_dict(read_yaml(spec_file))
    with ProgressBar(f"folding ({spec.method})") as bar:
        report = fold(spec, out_dir, progress=bar, relative_to=spec_file.parent, overwrite=force)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    console.print(f"[green]folded[/] {len(report['folded'])} tensors from {len(report['spec']['groups'])} modalities "
                  f"with {spec.method} in {report['timings']['total_s']:.2f} s -> {out_dir}")
