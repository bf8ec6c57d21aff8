"""Folding: merging the modality-specific parameter groups of ONE model into a single
modality-agnostic group (Sung et al., 2023), from the name maps to the written folder.

May import: models (the project's own folding tables), analysis (the distance metrics), data (Gram
matrices), run (the write loop), repos, methods, report, spec, plan, errors, progress, version."""


def __getattr__(name: str):
    # `from pivotmerge.fold import fold` without importing torch and the engine for `fold.tables`.
    if name == "fold":
        from pivotmerge.fold.fold_repo import fold

        return fold
    raise AttributeError(f"module 'pivotmerge.fold' has no attribute {name!r}")
