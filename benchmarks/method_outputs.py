"""sha256 of every method's merged shards on the example models, to show a refactor keeps outputs.

Runs under any checkout of the project (the example moved from ``pivotmerge.example`` to
``pivotmerge.data.example``), so the same script compares two trees:

    PYTHONPATH=. python benchmarks/method_outputs.py > after.txt
    (cd /path/to/old && PYTHONPATH=. python /path/to/benchmarks/method_outputs.py) > before.txt
    diff before.txt after.txt

Spec parameters use the spellings every version accepts (``lambda``, ``alpha``).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import pivotmerge

try:
    from pivotmerge.data.example import make_example
except ImportError:  # trees before the layout by stage
    from pivotmerge.example import make_example

# name -> (method, parameters, uses calibration data)
CASES: dict[str, tuple[str, dict, bool]] = {
    "linear": ("linear", {}, False),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, False),
    "ties": ("ties", {"density": 0.5, "lambda": 0.9}, False),
    "dare_linear": ("dare_linear", {"density": 0.6}, False),
    "dare_ties": ("dare_ties", {"density": 0.6, "normalize": True}, False),
    "slerp": ("slerp", {"t": 0.3}, False),
    "tsv": ("tsv", {"alpha": 0.8}, False),
    "iso_c": ("iso_c", {"alpha": 0.9}, False),
    "iso_cts": ("iso_cts", {"alpha": 1.1, "common_space_fraction": 0.6}, False),
    "pivotmerge": ("pivotmerge", {}, False),
    "pivotmerge_filtered": ("pivotmerge", {"filtering": True, "spectrum": "flatten_total", "residual_rank": 2}, False),
    "pivotmerge_data": ("pivotmerge", {"layer_weighting": "data"}, True),
    "pivotmerge_gram": ("pivotmerge", {"layer_weighting": "data", "combine": "gram"}, True),
    "pivotmerge_gram_merged": ("pivotmerge", {"combine": "gram", "gram_inputs": "merged"}, True),
    "regmean": ("regmean", {"alpha": 0.8}, True),
    "regmean_plus_plus": ("regmean", {"gram_inputs": "merged"}, True),
}


def shards_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ex = make_example(root / "ex", n_experts=3, seed=1, lm_experts=True, with_data=True, n_samples=4)
        for name in names or CASES:
            method, params, data = CASES[name]
            models = [{"model": str(e)} for e in ex.experts]
            if method == "slerp":
                models = models[:2]
            spec = {"method": method, "base_model": str(ex.base), "models": models, "parameters": params,
                    "device": "cpu", "seed": 3}
            if data:
                spec["calibration"] = {"dataset": str(ex.datasets["shapes"])}
            out = root / name
            pivotmerge.merge(spec, out)
            print(f"{name:24s} {shards_sha256(out)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
