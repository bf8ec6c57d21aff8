"""How the trained example's spec was chosen: candidate merges of its experts, scored on the dev splits only.

    PYTHONPATH=. python benchmarks/trained_example_method.py [--cache DIR] [--seed 0]

Builds (or reads from the cache) the small world that `pivotmerge quickstart` and
`pivotmerge make-example --data` use (`pivotmerge/bench/trained_example.py`),
scores the base and each expert, then merges the experts' projectors with every
candidate of each row's grid, as the quality suite does (`pivotmerge.merge`, the
evaluator's token accuracy), and prints each candidate's dev token accuracy per
domain, best row first. No test split is read. Prints the world's build time too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from transformers.utils import logging as hf_logging

from pivotmerge.bench import CACHE
from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.quality import Scorer, merged
from pivotmerge.bench.trained_example import SMALL
from pivotmerge.bench.variants import DATA_SCALE, LAYER_SCALE, SCALES, Variant
from pivotmerge.bench.world import build_world

CANDIDATES = (
    Variant("task_arithmetic", "task_arithmetic", grid={"scale": SCALES}),
    Variant("pivotmerge", "pivotmerge", grid=LAYER_SCALE),
    Variant("regmean_plus_plus (data)", "regmean", fixed={"gram_inputs": "merged"}, data=True),
    Variant("pivotmerge (data)", "pivotmerge", grid={**DATA_SCALE, "layer_weighting": ["weight", "data"]}, data=True),
)
DEFAULTS = (Variant("pivotmerge", "pivotmerge"), Variant("pivotmerge (data)", "pivotmerge", data=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    started = time.perf_counter()
    world = build_world(SMALL, args.seed, args.cache)
    print(f"world {world.root}: {time.perf_counter() - started:.0f} s to build or read")
    score = Scorer(world)
    header = f"{'dev token accuracy':58s}" + "".join(f"{d:>10s}" for d in (*DOMAINS, "average"))

    def line(name: str, row: dict[str, dict[str, float]]) -> str:
        return f"{name:58s}" + "".join(f"{row[d]['token_accuracy']:10.3f}" for d in (*DOMAINS, "average"))

    print(header)
    print(line("base", score(world.base, "dev")))
    for domain, path in world.experts.items():
        print(line(f"expert_{domain}", score(path, "dev")))
    rows = []
    with TemporaryDirectory() as tmp:
        for variant in CANDIDATES + DEFAULTS:
            for params in variant.candidates() if variant in CANDIDATES else [{}]:
                row = score(merged(world, variant, params, Path(tmp) / "merged"), "dev")
                rows.append((row["average"]["token_accuracy"], line(f"{variant.name} {params or 'defaults'}", row)))
    for _, text in sorted(rows, key=lambda r: -r[0]):
        print(text)


if __name__ == "__main__":
    main()
