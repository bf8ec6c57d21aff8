"""Is the data-free cap of the quality suite a property of its training regime?

Rebuilds the suite's worlds (pivotmerge/bench) under other training regimes and
scores the data-free merges, PivotMerge and RegMean(++) on them, each chosen on
the dev splits as in `pivotmerge bench quality`. Prints, per regime and seed, how
large the experts' updates are relative to the shared initialisation and the
test token accuracy of every row.

    python benchmarks/quality_regimes.py --regime low_lr --regime strong_warmup --seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from pivotmerge.bench.merging import VARIANTS, calibrate
from pivotmerge.bench.quality import FULL, Config, build_world, score, select

REGIMES: dict[str, Config] = {
    "default": FULL,
    # Experts and the joint projector at a quarter of the rate: updates about half as large.
    "low_lr": dataclasses.replace(FULL, lr=5e-4),
    # A shared initialisation warmed up 4x longer on 4x the images: a stronger common starting point.
    "strong_warmup": dataclasses.replace(FULL, n_warm=64, warm_steps=400),
}
ROWS = ("task_arithmetic", "tsv", "iso_c", "iso_cts", "pivotmerge", "regmean", "regmean_plus_plus")


def run(regime: str, seed: int) -> None:
    cfg = REGIMES[regime]
    world = build_world(cfg, seed, lambda _: None)
    experts = world.experts[cfg.expert_steps]
    calibration = calibrate(experts, world.base, world.lm, list(world.splits["calib"].values()))
    sizes = {k: [float((e[k] - v).norm() / v.norm()) for e in experts] for k, v in world.base.items() if v.dim() == 2}
    print(f"{regime} seed {seed}: ||W_k - W0|| / ||W0||: "
          + ", ".join(f"{k} {min(r):.2f}-{max(r):.2f}" for k, r in sizes.items()))
    accuracy = {"base": score(world.base, world, "test"), "joint": score(world.joint, world, "test")}
    variants = {v.name: v for v in VARIANTS}
    for name in ROWS:
        accuracy[name] = select(variants[name], world, calibration, seed).row["test"]
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    for regime in args.regime or list(REGIMES):
        for seed in range(args.seeds):
            run(regime, seed)


if __name__ == "__main__":
    main()
