"""PivotMerge: merge multimodal (LLaVA-style) models."""

__version__ = "0.1.0"

from .analyze import analyze
from .engine import check, merge, plan_merge
from .errors import CompatibilityError, MergeCancelled, PivotMergeError, RepoError, SpecError
from .fold_model import fold
from .progress import Progress
from .spec import MergeSpec, load_spec, spec_from_dict

__all__ = [
    "merge", "check", "analyze", "fold", "plan_merge", "MergeSpec", "load_spec", "spec_from_dict", "Progress",
    "PivotMergeError", "SpecError", "RepoError", "CompatibilityError", "MergeCancelled",
]
