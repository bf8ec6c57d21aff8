"""How much could PivotMerge still gain on the quality suite? Measured on dev, merged by the product.

For each seed's world of `pivotmerge bench quality` (built, or read from `--cache`), every
merge made by `pivotmerge.merge` from a spec and scored by the bench's evaluator:

1. **Layer-wise scales**: data-free PivotMerge with uniform weights and one scale for both
   projector layers, against a scale per layer (`scale_max` filtered by layer), each chosen on
   dev over SCALES (per layer: SCALES x SCALES) and scored on test: the most that any layer-wise
   weighting of the flattened shared update could add here.
2. **Self-set scales**: per layer, from the experts' updates ``d_k`` and the merged update ``M``
   at scale 1 (their weight matrices): ``carry``, the least-squares ``s`` of ``s c_k = 1`` with
   ``c_k = <M, d_k> / |d_k|^2`` (each expert's update carried whole); ``norm``, ``|s M| = mean_k
   |d_k|``; ``rss``, ``|s M|^2 = sum_k |d_k|^2``. Dev and test, against the default scales.
3. **Residuals and shared-space energy**: `residual_weight` x `energy`, `scale_max` chosen on dev.
4. **Data mode against its ceiling**: the joint projector (trained on every domain), RegMean++
   (`off_diagonal_scale` chosen on dev) and PivotMerge with calibration data at its defaults, on test.

    python benchmarks/quality_headroom.py --cache /tmp/qcache --seeds 5 --out headroom.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from pivotmerge.bench.quality import FULL, PROJECTOR, PROJECTOR_LAYERS, Scorer, merged, select
from pivotmerge.bench.variants import Variant
from pivotmerge.bench.world import World, build_world

SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
ENERGIES = (0.5, 0.7, 0.9, 0.95)
RESIDUALS = (0.0, 0.5, 1.0)
FREE = Variant("pivotmerge", "pivotmerge")
REGMEAN_PP = Variant("regmean_plus_plus", "regmean", fixed={"gram_inputs": "merged"},
                     grid={"off_diagonal_scale": [0.5, 0.9, 1.0]}, data=True)
DATA = Variant("pivotmerge_data", "pivotmerge", data=True)
Scores = tuple[float, float]  # dev, test mean token accuracy


def layer_scales(scales: tuple[float, float]) -> list[dict[str, Any]]:
    """A `scale_max`: `scales[0]` for the projector's first layer, `scales[1]` for its second."""
    return [{"filter": rf"\.{PROJECTOR_LAYERS[0]}\.", "value": scales[0]}, {"value": scales[1]}]


def per_layer(scales: tuple[float, float]) -> dict[str, Any]:
    """Uniform weights and `layer_scales(scales)`."""
    return {"layer_weighting": "uniform", "scale_max": layer_scales(scales)}


class Probe:
    """Merges of one world, scored on dev and test."""

    def __init__(self, world: World, work: Path) -> None:
        self.world, self.work, self.score = world, work, Scorer(world)

    def accuracy(self, path: Path, split: str) -> float:
        return self.score(path, split)["average"]["token_accuracy"]

    def scores(self, variant: Variant, params: dict[str, Any]) -> Scores:
        path = merged(self.world, variant, params, self.work / "merged")
        return self.accuracy(path, "dev"), self.accuracy(path, "test")

    def dev_chosen(self, variant: Variant) -> dict[str, Any]:
        """The bench's grid search (`select`): the first candidate best on dev, and its test score."""
        chosen = select(variant, self.world, self.score, self.work / "search")
        return {"params": chosen["params"], "dev": max(s["dev_token_accuracy"] for s in chosen["search"]),
                "test": chosen["test"]["average"]["token_accuracy"]}


def self_set_scales(probe: Probe) -> dict[str, tuple[float, float]]:
    """Per rule, the two layers' scales computed from the experts' updates and the merged update at scale 1."""
    path = merged(probe.world, FREE, per_layer((1.0, 1.0)), probe.work / "unscaled")
    merged_state, base = load_file(str(path / "model.safetensors")), load_file(str(probe.world.base / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in probe.world.experts.values()]
    rules: dict[str, list[float]] = {"carry": [], "norm": [], "rss": []}
    for layer in PROJECTOR_LAYERS:
        name = f"{PROJECTOR}{layer}.weight"
        update = merged_state[name].double() - base[name].double()
        deltas = [e[name].double() - base[name].double() for e in experts]
        carried = torch.tensor([float((update * d).sum() / (d * d).sum()) for d in deltas])
        norms = torch.tensor([float(d.norm()) for d in deltas])
        rules["carry"].append(float(carried.sum() / carried.square().sum()))
        rules["norm"].append(float(norms.mean() / update.norm()))
        rules["rss"].append(float(norms.square().sum().sqrt() / update.norm()))
    return {rule: (s[0], s[1]) for rule, s in rules.items()}


def run_seed(seed: int, cache: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    probe = Probe(build_world(FULL.world, seed, cache, log), work)
    out: dict[str, Any] = {"seed": seed}
    log(f"seed {seed}: layer-wise scales")
    uniform = {"layer_weighting": "uniform"}
    out["one_scale"] = probe.dev_chosen(Variant("one scale", "pivotmerge", uniform, {"scale_max": list(SCALES)}))
    out["per_layer_scales"] = probe.dev_chosen(Variant("a scale per layer", "pivotmerge", uniform, {
        "scale_max": [layer_scales(pair) for pair in itertools.product(SCALES, SCALES)]}))
    log(f"seed {seed}: self-set scales")
    out["defaults"] = dict(zip(("dev", "test"), probe.scores(FREE, {})))
    out["self_set"] = {rule: {"scales": scales, **dict(zip(("dev", "test"), probe.scores(FREE, per_layer(scales))))}
                       for rule, scales in self_set_scales(probe).items()}
    log(f"seed {seed}: residuals x energy")
    out["residuals"] = {f"energy {e}, residual_weight {r}": probe.dev_chosen(Variant(
        "residuals", "pivotmerge", {"energy": e, "residual_weight": r}, {"scale_max": [0.5, 0.75, 1.0, 1.5, 2.0]}))
        for e, r in itertools.product(ENERGIES, RESIDUALS)}
    log(f"seed {seed}: data mode and its ceiling")
    out["joint_test"] = probe.accuracy(probe.world.joint, "test")
    out["regmean_plus_plus"] = probe.dev_chosen(REGMEAN_PP)
    out["pivotmerge_data"] = dict(zip(("dev", "test"), probe.scores(DATA, {})))
    return out


def mean(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> str:
    return f"{statistics.mean(get(r) for r in runs):.4f}"


def report(runs: list[dict[str, Any]]) -> str:
    lines = [f"Mean over {len(runs)} seed(s); dev chooses, test reported.", "",
             "| row | dev | test | per seed (test) |", "|---|---|---|---|"]

    def row(label: str, get: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        tests = " ".join(f"{get(r)['test']:.3f}" for r in runs)
        lines.append(f"| {label} | {mean(runs, lambda r: get(r)['dev'])} | {mean(runs, lambda r: get(r)['test'])} | {tests} |")

    row("defaults (data-free)", lambda r: r["defaults"])
    row("one scale, dev-chosen", lambda r: r["one_scale"])
    row("a scale per layer, dev-chosen", lambda r: r["per_layer_scales"])
    for rule in runs[0]["self_set"]:
        row(f"self-set scale: {rule}", lambda r, rule=rule: r["self_set"][rule])
    for key in runs[0]["residuals"]:
        row(f"{key}, scale_max dev-chosen", lambda r, key=key: r["residuals"][key])
    joint = " ".join(f"{r['joint_test']:.3f}" for r in runs)
    lines.append(f"| joint projector (ceiling) | - | {mean(runs, lambda r: r['joint_test'])} | {joint} |")
    row("RegMean++ (alpha dev-chosen)", lambda r: r["regmean_plus_plus"])
    row("PivotMerge with calibration, defaults", lambda r: r["pivotmerge_data"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="The bench's world cache (built there if missing).")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="Write every score as JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: as the bench runs them
    with tempfile.TemporaryDirectory() as work:
        runs = [run_seed(seed, args.cache, Path(work), lambda m: print(m, flush=True)) for seed in range(args.seeds)]
    print(report(runs))
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
