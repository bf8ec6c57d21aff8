"""The service's package arrows: app -> service_core <- workers; workers never import app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules_loaded_by(module: str) -> set[str]:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_workers_import_nothing_from_app() -> None:
    # One interpreter for all four: none of them loads app if together they load none.
    entry_points = ("workers.tasks", "workers.worker", "workers.split_parts", "workers.kinds")
    loaded = modules_loaded_by(", ".join(entry_points))
    assert set(entry_points) <= loaded
    assert not {m for m in loaded if m == "app" or m.startswith("app.")}


def test_service_core_imports_neither_app_nor_workers() -> None:
    loaded = modules_loaded_by("service_core.db, service_core.models, service_core.job_states, service_core.settings, service_core.storage")
    assert not {m for m in loaded if m.split(".")[0] in {"app", "workers"}}
