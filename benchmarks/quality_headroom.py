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

With ``--suite deep`` (the deep suite's worlds, where a merge spans the projector, every layer of
the language model and the tower's top layers) it asks the layer-wise question only: data-free
PivotMerge with uniform weights and one dev-chosen scale, against a dev-chosen scale per layer
group (GROUPS: the projector, the vision tower, the language model's lower and upper halves), found
by coordinate ascent on dev from the one-scale optimum (each group's scale over DEEP_SCALES in
turn, the others held; two sweeps). Both are scored once on test. DEEP_SCALES reaches lower than
SCALES: merging whole language models, one scale's dev optimum sat at SCALES' lowest value.

    python benchmarks/quality_headroom.py --cache /tmp/qcache --seeds 5 --out headroom.json
    python benchmarks/quality_headroom.py --suite deep --cache /tmp/qcache --seeds 5 --out headroom-deep.json
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

from pivotmerge.bench.quality import DEEP, FULL, PROJECTOR, PROJECTOR_LAYERS, Scorer, chosen_scores, merged, select
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
# The deep suite's layer groups as `scale_max` filters (the first that matches a tensor name wins;
# None: every tensor no filter before it matched). The language model has 6 layers.
GROUPS = (("projector", r"multi_modal_projector\."), ("vision_tower", r"vision_tower\."),
          ("language_model: embeddings, layers 0-2", r"language_model\.(embed_tokens|layers\.[0-2])\."),
          ("language_model: layers 3-5, norm, lm_head", None))
UNIFORM = {"layer_weighting": "uniform"}
DEEP_SCALES = (0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5)


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
        return chosen_scores(select(variant, self.world, self.score, self.work / "search"))


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


def group_scales(scales: list[float]) -> dict[str, Any]:
    """Uniform weights and `scales[i]` as the `scale_max` of GROUPS[i]."""
    return {**UNIFORM, "scale_max": [{"filter": f, "value": v} if f else {"value": v}
                                      for (_, f), v in zip(GROUPS, scales, strict=True)]}


def coordinate_ascent(probe: Probe, start: float, start_dev: float, sweeps: int = 2) -> dict[str, Any]:
    """A scale per group chosen on dev, one group at a time over DEEP_SCALES with the others held, from
    `start` everywhere (dev `start_dev`); only a strictly better dev score moves a scale."""
    scales, best = [start] * len(GROUPS), start_dev
    for _ in range(sweeps):
        for g in range(len(GROUPS)):
            for value in DEEP_SCALES:
                if value == scales[g]:
                    continue
                candidate = [*scales[:g], value, *scales[g + 1:]]
                dev = probe.accuracy(merged(probe.world, FREE, group_scales(candidate), probe.work / "merged"), "dev")
                if dev > best:
                    scales, best = candidate, dev
    path = merged(probe.world, FREE, group_scales(scales), probe.work / "merged")
    return {"scales": dict(zip((name for name, _ in GROUPS), scales)), "dev": best, "test": probe.accuracy(path, "test")}


def run_deep_seed(seed: int, cache: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    probe = Probe(build_world(DEEP.world, seed, cache, log), work)
    log(f"seed {seed}: one scale")
    out: dict[str, Any] = {"seed": seed, "defaults": dict(zip(("dev", "test"), probe.scores(FREE, {})))}
    out["one_scale"] = probe.dev_chosen(Variant("one scale", "pivotmerge", UNIFORM, {"scale_max": list(DEEP_SCALES)}))
    log(f"seed {seed}: a scale per layer group")
    out["group_scales"] = coordinate_ascent(probe, out["one_scale"]["params"]["scale_max"], out["one_scale"]["dev"])
    return out


def deep_report(runs: list[dict[str, Any]]) -> str:
    lines = [f"Deep suite, mean over {len(runs)} seed(s); dev chooses, test reported.", "",
             "| row | dev | test | per seed (test) |", "|---|---|---|---|"]
    for label, key in (("PivotMerge without data, defaults", "defaults"), ("one scale (uniform weights), dev-chosen", "one_scale"),
                       ("a scale per layer group, dev-chosen", "group_scales")):
        tests = " ".join(f"{r[key]['test']:.3f}" for r in runs)
        lines.append(f"| {label} | {mean(runs, lambda r, key=key: r[key]['dev'])} | {mean(runs, lambda r, key=key: r[key]['test'])} | {tests} |")
    gaps = [r["group_scales"]["test"] - r["one_scale"]["test"] for r in runs]
    lines += ["", "Per seed, a scale per group minus one scale (test): " + " ".join(f"{g:+.4f}" for g in gaps)
              + f"; mean {statistics.mean(gaps):+.4f}", "", "Dev-chosen scales per seed:"]
    lines += [f"- seed {r['seed']}: one {r['one_scale']['params']['scale_max']}; per group "
              + ", ".join(f"{name} {v}" for name, v in r["group_scales"]["scales"].items()) for r in runs]
    return "\n".join(lines)


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
    parser.add_argument("--suite", choices=("projector", "deep"), default="projector")
    parser.add_argument("--cache", type=Path, required=True, help="The bench's world cache (built there if missing).")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="Write every score as JSON here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: as the bench runs them
    probe_seed, write_report = (run_deep_seed, deep_report) if args.suite == "deep" else (run_seed, report)
    with tempfile.TemporaryDirectory() as work:
        runs = [probe_seed(seed, args.cache, Path(work), lambda m: print(m, flush=True)) for seed in range(args.seeds)]
    print(write_report(runs))
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
