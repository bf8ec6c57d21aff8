"""Do the quality suite's conclusions hold under other training regimes?

Rebuilds the suite's worlds (pivotmerge/bench/world.py) with the experts and
the joint projector trained at other rates or lengths, merges with the bar's
rows through `pivotmerge.merge`, each chosen on the dev splits as in
`pivotmerge bench quality`, and prints per regime and seed how far the experts
moved from the shared initialisation and every row's test token accuracy.

    python benchmarks/quality_regimes.py --regime low_lr --regime long --seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from pivotmerge.bench.quality import FULL, PROJECTOR, Scorer, select
from pivotmerge.bench.variants import TUNED
from pivotmerge.bench.world import Config, build_world

REGIMES: dict[str, Config] = {
    "default": FULL.world,
    # Experts and the joint projector at a quarter of the rate: updates closer to the initialisation.
    "low_lr": dataclasses.replace(FULL.world, lr=FULL.world.lr / 4),
    # Twice the steps: experts further from the initialisation, each better on its own domain.
    "long": dataclasses.replace(FULL.world, expert_steps=2 * FULL.world.expert_steps),
}
ROWS = ("task_arithmetic", "tsv", "iso_c", "iso_cts", "pivotmerge", "regmean_plus_plus", "pivotmerge_data")


def run(regime: str, seed: int, cache: Path, work: Path) -> None:
    world = build_world(REGIMES[regime], seed, cache)
    base = {k: v for k, v in load_file(world.base / "model.safetensors").items()
            if k.startswith(PROJECTOR) and v.dim() == 2}
    moved = {k: [float((load_file(p / "model.safetensors")[k] - v).norm() / v.norm()) for p in world.experts.values()]
             for k, v in base.items()}
    print(f"{regime} seed {seed}: ||W_k - W0|| / ||W0||: "
          + ", ".join(f"{k.removeprefix(PROJECTOR)} {min(r):.2f}-{max(r):.2f}" for k, r in moved.items()))
    score = Scorer(world)
    accuracy = {"base": score(world.base, "test"), "joint": score(world.joint, "test")}
    for variant in (v for v in TUNED if v.name in ROWS):
        accuracy[variant.name] = select(variant, world, score, work / variant.name)["test"]
    print("  " + "  ".join(f"{n} {a['average']['token_accuracy']:.3f}" for n, a in accuracy.items()), flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", action="append", choices=list(REGIMES), help="regime(s) to run (default: all)")
    parser.add_argument("--seeds", type=_positive, default=1, help="seeds 0..N-1 per regime")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pivotmerge" / "bench-worlds",
                        help="where built worlds are kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        for regime in args.regime or list(REGIMES):
            for seed in range(args.seeds):
                run(regime, seed, args.cache, Path(work) / f"{regime}-{seed}")


if __name__ == "__main__":
    main()
