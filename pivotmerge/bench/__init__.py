"""Benchmarks: merge quality on a synthetic heterogeneous post-alignment suite (``quality``), and
Sung et al.'s modality-agnostic merging study (``modality``).

May import: analysis, data, run, fold, models."""

from pathlib import Path

# Where built worlds are kept by default, keyed by config and seed: the suite's, and the trained example's.
CACHE = Path.home() / ".cache" / "pivotmerge" / "bench-worlds"
