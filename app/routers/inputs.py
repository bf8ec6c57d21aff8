"""/v1/inputs: the model repos and datasets under the allowed roots, for choosing a merge's inputs."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.deps import SettingsDep, TeamDep
from app.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/inputs", tags=["inputs"], responses=ERROR_RESPONSES)

MAX_DEPTH = 4  # below a root; deep enough for org/name/revision layouts, shallow enough to answer fast
MAX_ENTRIES = 500


class InputList(BaseModel):
    models: list[str] = Field(..., description="Folders holding a config.json (Hugging Face repos).")
    datasets: list[str] = Field(..., description="JSONL dataset files.")
    truncated: bool = Field(False, description=f"True when more than {MAX_ENTRIES} entries were found.")


def scan_root(root: Path) -> tuple[list[str], list[str]]:
    """Model folders and .jsonl files under `root`, not following links out of it, hidden names skipped."""
    models: list[str] = []
    datasets: list[str] = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        if "config.json" in files:
            models.append(folder)
            dirs[:] = []  # a repo's own sub-folders are not further repos
        datasets.extend(str(Path(folder) / f) for f in sorted(files) if f.endswith(".jsonl"))
    return models, datasets


@router.get("", operation_id="list_inputs", summary="Model repos and datasets under the allowed roots")
def list_inputs(team: TeamDep, settings: SettingsDep) -> InputList:
    models: list[str] = []
    datasets: list[str] = []
    for root in settings.allowed_roots:
        found_models, found_datasets = scan_root(root)
        models += found_models
        datasets += found_datasets
    truncated = len(models) > MAX_ENTRIES or len(datasets) > MAX_ENTRIES
    return InputList(models=models[:MAX_ENTRIES], datasets=datasets[:MAX_ENTRIES], truncated=truncated)
