"""PivotMerge: merge multimodal (LLaVA-style) models."""

from pivotmerge.version import __version__
from pivotmerge.analysis.analyze import analyze
from pivotmerge.plan.plan import check, plan_merge
from pivotmerge.run.engine import merge
from pivotmerge.errors import CompatibilityError, MergeCancelled, PivotMergeError, RepoError, SpecError
from pivotmerge.analysis.fold_repo import fold
from pivotmerge.progress import Progress
from pivotmerge.spec.schema import MergeSpec, load_spec, spec_from_dict

__all__ = [
    "merge", "check", "analyze", "fold", "plan_merge", "MergeSpec", "load_spec", "spec_from_dict", "Progress",
    "PivotMergeError", "SpecError", "RepoError", "CompatibilityError", "MergeCancelled",
]
