"""Two-pass against block-after-block refit of ``gram_inputs: merged``, on a quality suite's worlds.

Each merge is made by `pivotmerge.merge` from the bench's own spec (`pivotmerge.bench.quality.merged`)
and scored by the bench's evaluator (`Scorer`) on dev and test. ``two`` swaps the engine's two-pass
route (`_refit_on_first_pass`: a whole first pass measured, every layer refitted at once; still the
route of merges that grow the vocabulary) in for the block refit; ``seq`` is the engine as it is.

    python benchmarks/refit_order.py deep 0,1 \
        '[["rpp", "regmean", {"off_diagonal_scale": 1.0, "gram_inputs": "merged"}, "two"]]' [CACHE]

Prints one JSON line per merge: seed, label, route, mean dev and test token accuracy, merge seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import pivotmerge.run.merge as engine
from pivotmerge.bench.quality import DEEP_WORLD, WORLD, Scorer, merged
from pivotmerge.bench.variants import Variant
from pivotmerge.bench.world import build_world

CACHES = {"deep": (DEEP_WORLD, Path("/tmp/qcache-deep")), "projector": (WORLD, Path("/tmp/qcache-proj"))}


def main(suite: str, seeds: list[int], configs: list[list], cache: Path | None = None) -> None:
    torch.set_num_threads(1)  # tiny models on a shared machine, as the bench runs them
    cfg, default_cache = CACHES[suite]
    block_refit = engine._refit_in_order
    for seed in seeds:
        world = build_world(cfg, seed, cache or default_cache)
        score = Scorer(world)
        for label, method, params, route in configs:
            engine._refit_in_order = block_refit if route == "seq" else engine._refit_on_first_pass
            started = time.perf_counter()
            out = merged(world, Variant(label, method, data=True), params, Path(f"/tmp/refit-order-{suite}"))
            seconds = time.perf_counter() - started
            dev, test = (score(out, split)["average"]["token_accuracy"] for split in ("dev", "test"))
            print(json.dumps({"seed": seed, "label": label, "route": route, "dev": round(dev, 4),
                              "test": round(test, 4), "merge_s": round(seconds, 1)}), flush=True)
    engine._refit_in_order = block_refit


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], json.loads(sys.argv[3]),
         Path(sys.argv[4]) if len(sys.argv) > 4 else None)
