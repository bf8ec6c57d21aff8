"""PivotMerge: merge multimodal (LLaVA-style) models.

The names below are imported on first use (PEP 562): `import pivotmerge.cli.main`
then costs click, not torch, pydantic and every stage of the engine, and
`pivotmerge merge` imports only what merging needs. Folding is its own stage:
`from pivotmerge.fold import fold`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from pivotmerge.version import __version__

if TYPE_CHECKING:  # what each name is, for readers and type checkers
    from pivotmerge.analysis.analyze import analyze
    from pivotmerge.errors import CompatibilityError, MergeCancelled, PivotMergeError, RepoError, SpecError
    from pivotmerge.plan.plan import check, plan_merge
    from pivotmerge.progress import Progress
    from pivotmerge.run.engine import merge
    from pivotmerge.spec.schema import MergeSpec, load_spec, spec_from_dict

# name -> the module that defines it
_EXPORTS = {
    "merge": "pivotmerge.run.engine", "check": "pivotmerge.plan.plan", "plan_merge": "pivotmerge.plan.plan",
    "analyze": "pivotmerge.analysis.analyze",
    "MergeSpec": "pivotmerge.spec.schema", "load_spec": "pivotmerge.spec.schema",
    "spec_from_dict": "pivotmerge.spec.schema",
    "Progress": "pivotmerge.progress", "PivotMergeError": "pivotmerge.errors", "SpecError": "pivotmerge.errors",
    "RepoError": "pivotmerge.errors", "CompatibilityError": "pivotmerge.errors", "MergeCancelled": "pivotmerge.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pivotmerge' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
