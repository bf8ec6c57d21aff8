"""The engine's commands: merge, methods, analyze, fold.

What needs torch (methods, specs, the engine) is imported inside each command, so
that listing commands and `--help` do not wait for it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
from rich.console import Console
from rich.table import Table

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
    if spec.push_to_hub is not None:  # with huggingface_hub's own token (HF_TOKEN or `hf auth login`), as `pivotmerge push`
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
        return " | ".join(_type_name(a) for a in args) if type(None) not in args or len(args) > 2 else _type_name(args[0]) + "?"
    return getattr(annotation, "__name__", str(annotation))


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def methods_command(as_json: bool) -> None:
    """List the merge methods and their parameters."""
    from pivotmerge.methods import all_methods

    methods = all_methods()
    if as_json:
        click.echo(json.dumps({name: {"summary": m.summary, "base_model": m.base, "min_models": m.min_models,
                                      "max_models": m.max_models, "per_model": list(m.per_model),
                                      "engine_params": list(m.engine_params),
                                      "defaults_with_calibration": dict(m.with_calibration),
                                      "aliases": {old: new for old, new in m.aliases().items() if old != new},
                                      "search": {p: asdict(s) for p, s in m.search_space.items()},
                                      "parameters": m.params.model_json_schema().get("properties", {})}
                               for name, m in methods.items()}, indent=2))
        return
    out = Console()
    for name, m in methods.items():
        table = Table(title=f"[bold]{name}[/] — {m.summary}", title_justify="left", show_edge=False)
        for col in ("parameter", "type", "default", "search", "description"):
            table.add_column(col, no_wrap=col in ("parameter", "default"))  # names stay whole, so they can be searched
        old_names = {}
        for old, new in m.aliases().items():
            if old != new:
                old_names.setdefault(new, []).append(old)
        search = m.search_space
        for pname, field in m.params.model_fields.items():
            per = " (per model)" if pname in m.per_model else ""
            also = f" (also: {', '.join(old_names[pname])})" if pname in old_names else ""
            default = repr(field.default) + (f"\nwith data: {m.with_calibration[pname]!r}" if pname in m.with_calibration else "")
            table.add_row(pname + per, _type_name(field.annotation), default,
                          _search_text(search.get(pname)), (field.description or "") + also)
        for need in m.engine_params:
            table.add_row(f"{need} (set by the engine)", "calibration", "", "", "Measured on the spec's calibration data when "
                          "the parameters need it; never set in a spec.")
        models = f"{m.min_models}" + ("" if m.max_models == m.min_models else f"..{m.max_models or 'n'}")
        out.print(table)
        with_data = "; 'with data': the default when the spec gives calibration data" if m.with_calibration else ""
        out.print(f"  base_model: {m.base}; models: {models}{with_data}\n")


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
