"""Folding tables of the model families that have one: the name maps a fold spec may leave
out, and the model type the folded folder becomes, so it loads as the shared model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pivotmerge.models import multiway


@dataclass(frozen=True)
class FoldTable:
    groups: Mapping[str, Mapping[str, Any]]  # modality -> NameMap fields
    folded_model_type: str
    folded_architecture: str
    parts: Mapping[str, tuple[str, ...]]  # part of a block (attention, ffn, ...) -> its module names


TABLES: dict[str, FoldTable] = {
    multiway.MULTIWAY_TYPE: FoldTable(multiway.FOLD_GROUPS, multiway.SHARED_TYPE, multiway.SharedVLModel.__name__,
                                        multiway.PARTS),
}


def table_for(model_type: str | None) -> FoldTable | None:
    return TABLES.get(model_type or "")


def folded_config(config: Mapping[str, Any], table: FoldTable) -> dict[str, Any]:
    """`config` (config.json's fields) as the folded, modality-agnostic model's."""
    return {**config, "model_type": table.folded_model_type, "architectures": [table.folded_architecture]}


SHARED = "shared"


def fold_groups(table: FoldTable, names: Iterable[str]) -> dict[tuple[str, str], list[str]]:
    """(modality, part) -> its tensors, in the table's modality order; tensors no map claims are
    (``shared``, ``-``): kept as they are by a fold."""
    out: dict[tuple[str, str], list[str]] = {}
    for name in names:
        key = (SHARED, "-")
        for modality, name_map in table.groups.items():
            if re.search(str(name_map["pattern"]), name):
                part = next((p for p, modules in table.parts.items() if any(f".{m}." in name for m in modules)),
                            "other")
                key = (modality, part)
                break
        out.setdefault(key, []).append(name)
    order = list(table.groups) + [SHARED]
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])))
