"""`pivotmerge inspect REPO`: where the project places each tensor of a model.

Shows the family table chosen for the model's `model_type`, each component's
tensors and layers, and every tensor no rule of the table claims (such a tensor
is never merged by `components`, only by an `include` pattern).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pivotmerge.errors import RepoError
from pivotmerge.fold.tables import fold_groups, table_for
from pivotmerge.repos.architectures import Architecture, TensorPlace, architecture_for, place_tensors
from pivotmerge.repos.model_repo import ModelRepo


@dataclass(frozen=True)
class ComponentSummary:
    component: str
    tensors: int
    parameters: int
    layers: tuple[int, int] | None  # first and last layer index, if any tensor has one
    example: str


def summarise(repo: ModelRepo, arch: Architecture, places: dict[str, TensorPlace]) -> list[ComponentSummary]:
    out = []
    for component in sorted({p.component_name for p in places.values()}):
        names = [n for n, p in places.items() if p.component_name == component]
        layers = [layer for n in names if (layer := places[n].layer) is not None]
        out.append(ComponentSummary(component, len(names), sum(math.prod(repo.tensors[n].shape) for n in names),
                                    (min(layers), max(layers)) if layers else None, names[0]))
    return out


@click.command("inspect")
@click.argument("repo")
@click.option("--tensors", "per_tensor", is_flag=True, help="List every tensor with its component, layer and shape.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_command(repo: str, per_tensor: bool, as_json: bool) -> None:
    """Show the family table, components and layers PivotMerge assigns to REPO's tensors."""
    try:
        model = ModelRepo.open(repo, relative_to=Path.cwd())
    except OSError as exc:
        raise RepoError(f"{repo}: cannot read: {exc.strerror}") from None
    with model:
        arch = architecture_for(model.model_type)
        places = place_tensors(arch, model.tensors)
        unclaimed = sorted(n for n, p in places.items() if p.component is None)
        summary = summarise(model, arch, places)
        table_of_folds = table_for(model.model_type)
        groups = fold_groups(table_of_folds, model.tensors) if table_of_folds else {}
        group_rows = [{"modality": m, "part": p, "tensors": len(ns),
                       "parameters": sum(math.prod(model.tensors[n].shape) for n in ns), "example": ns[0]}
                      for (m, p), ns in groups.items()]
        if as_json:
            click.echo(json.dumps({
                "model": str(model.path), "model_type": model.model_type, "family": arch.name,
                "components": [s.__dict__ for s in summary], "unclaimed": unclaimed,
                **({"fold_groups": group_rows} if group_rows else {}),
                **({"tensors": [{"name": n, "component": p.component_name, "layer": p.layer,
                                 "shape": list(model.tensors[n].shape)} for n, p in places.items()]}
                   if per_tensor else {}),
            }, indent=2))
            return
        console = Console(width=160)
        fallback = " (generic fallback: no table for this model_type)" if not arch.model_types else ""
        console.print(f"{model.path}\nmodel_type: {model.model_type}   family table: {arch.name}{fallback}")
        table = Table("component", "tensors", "parameters", "layers", "e.g.")
        for s in summary:
            table.add_row(s.component, str(s.tensors), f"{s.parameters:,}",
                          f"{s.layers[0]}-{s.layers[1]}" if s.layers else "-", s.example)
        console.print(table)
        if group_rows and table_of_folds is not None:
            folds = Table("modality", "part", "tensors", "parameters", "e.g.",
                          title=f"fold groups (pivotmerge fold folds them into {table_of_folds.folded_model_type})")
            for row in group_rows:
                folds.add_row(str(row["modality"]), str(row["part"]), str(row["tensors"]), f"{row['parameters']:,}",
                              str(row["example"]))
            console.print(folds)
        if per_tensor:
            detail = Table("tensor", "component", "layer", "shape")
            for n, p in places.items():
                detail.add_row(n, p.component_name, "-" if p.layer is None else str(p.layer),
                               str(list(model.tensors[n].shape)))
            console.print(detail)
        console.print(f"unclaimed by the table: {', '.join(unclaimed) if unclaimed else 'none'}")
