"""Folding tables of the model families that have one: the name maps a fold spec may leave
out, and the model type the folded folder becomes, so it loads as the shared model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pivotmerge.models import multiway


@dataclass(frozen=True)
class FoldTable:
    groups: Mapping[str, Mapping[str, Any]]  # modality -> NameMap fields
    folded_model_type: str
    folded_architecture: str


TABLES: dict[str, FoldTable] = {
    multiway.MULTIWAY_TYPE: FoldTable(multiway.FOLD_GROUPS, multiway.SHARED_TYPE, multiway.SharedVLModel.__name__),
}


def table_for(model_type: str | None) -> FoldTable | None:
    return TABLES.get(model_type or "")


def folded_config(config: Mapping[str, Any], table: FoldTable) -> dict[str, Any]:
    """`config` (config.json's fields) as the folded, modality-agnostic model's."""
    return {**config, "model_type": table.folded_model_type, "architectures": [table.folded_architecture]}
