"""Benchmarks: merge quality on a synthetic heterogeneous post-alignment suite (``quality``).

May import: analysis, data, run."""
