"""The quality benchmark: experts, the joint projector and every merge method on every domain.

Per seed: build the domains, pre-train and freeze the towers, train one expert
projector per domain from one shared initialisation and a joint projector on
all domains, then merge the experts with every variant, choosing its
hyperparameters on the dev splits only, and score the choice on the test
splits. Then, across scenarios (domain pairs, triples, all four; short and full
training), correlate each weight-distance metric with the quality a merge loses.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from pivotmerge.analysis import metrics
from pivotmerge.bench.domains import DOMAINS, make_split
from pivotmerge.bench.merging import VARIANTS, Calibration, Variant, calibrate, layer_of, merge
from pivotmerge.bench.models import (PROJECTOR_LAYERS, Encoded, LanguageModel, Projector, State, encode_split, evaluate,
                     pretrain_lm, pretrain_vision, train_projector)

# Experts and the joint projector fine-tune the warmed-up initialisation at a lower rate
# (Config.lr) than its warm-up; even so their updates grow about as large as the weights
# (docs/results.md), as stage-1 alignment moves a projector far from where it started.
WARM_LR = 5e-3
SCORES = ("caption_loss", "token_accuracy", "qa_exact_match")
# The baselines the bar asks data-free PivotMerge to beat; its layer attribution takes, per seed,
# the one with the best dev accuracy as the rival.
DATA_FREE_BASELINES = ("linear", "task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    seeds: int
    n_train: int  # images per domain
    n_dev: int
    n_test: int
    n_calib: int  # calibration images per domain, for RegMean and PivotMerge's data mode
    n_warm: int  # images per domain in the shared initialisation's brief warm-up
    warm_steps: int
    vision_steps: int
    lm_steps: int
    expert_steps: int
    joint_steps: int  # the joint projector shares its capacity among all domains, so it trains longer
    short_steps: int  # the "short training" snapshot of the merge-success scenarios
    lr: float = 2e-3  # Adam rate of the experts and the joint projector


QUICK = Config(seeds=1, n_train=400, n_dev=100, n_test=150, n_calib=64, n_warm=16, warm_steps=100,
               vision_steps=200, lm_steps=300, expert_steps=300, joint_steps=600, short_steps=100)
FULL = Config(seeds=3, n_train=600, n_dev=150, n_test=300, n_calib=64, n_warm=16, warm_steps=100,
              vision_steps=300, lm_steps=500, expert_steps=800, joint_steps=1200, short_steps=200)


@dataclass
class World:
    """One seed's frozen towers, encoded splits, shared init and trained projectors."""

    lm: LanguageModel
    splits: dict[str, dict[str, Encoded]]  # split name -> domain -> data
    base: State
    experts: dict[int, list[State]]  # training steps -> one expert per domain
    joint: State


def build_world(cfg: Config, seed: int, progress: Progress) -> World:
    # The towers' and projector's initial weights come from the global generator: seeded first, so
    # one seed gives one world and reruns of the command give the same table.
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = {"train": cfg.n_train, "dev": cfg.n_dev, "test": cfg.n_test, "calib": cfg.n_calib, "warm": cfg.n_warm}
    raw = {name: {d: make_split(d, n, seed=1000 * seed + 10 * i + j) for j, d in enumerate(DOMAINS)}
           for i, (name, n) in enumerate(sizes.items())}
    progress("pre-training the vision tower")
    vision = pretrain_vision(torch.cat([s.images for s in raw["train"].values()]), cfg.vision_steps, gen)
    progress("pre-training the language model")
    lm = pretrain_lm(list(raw["train"].values()), cfg.lm_steps, gen)
    splits = {name: {d: encode_split(vision, s) for d, s in by_domain.items()} for name, by_domain in raw.items()}
    progress("warming up the shared initialisation")
    warm = list(splits.pop("warm").values())
    base = train_projector(Projector(), lm, warm, cfg.warm_steps, WARM_LR, gen)[cfg.warm_steps]
    experts: dict[int, list[State]] = {cfg.short_steps: [], cfg.expert_steps: []}
    for d in DOMAINS:
        progress(f"training the {d} expert")
        snaps = train_projector(_from(base), lm, [splits["train"][d]], cfg.expert_steps, cfg.lr, gen, (cfg.short_steps,))
        for steps in experts:
            experts[steps].append(snaps[steps])
    progress("training the joint projector")
    joint = train_projector(_from(base), lm, list(splits["train"].values()), cfg.joint_steps, cfg.lr, gen)[cfg.joint_steps]
    return World(lm, splits, base, experts, joint)


def _from(state: State) -> Projector:
    p = Projector()
    p.load_state_dict(state)
    return p


def task_vector_oracle(experts: list[State], base: State, joint: State) -> State:
    """A reference, not a merge: per tensor, the combination ``W0 + sum_k c_k d_k`` of the experts'
    task vectors closest (least squares) to the joint projector's weights. It knows the joint
    projector, so it bounds what any per-tensor weighting of whole task vectors can reach."""
    out: State = {}
    for key, pivot in base.items():
        deltas = torch.stack([(e[key] - pivot).reshape(-1) for e in experts], dim=1).double()
        coef = torch.linalg.lstsq(deltas, (joint[key] - pivot).reshape(-1, 1).double()).solution
        out[key] = pivot + (deltas @ coef).to(pivot.dtype).view_as(pivot)
    return out


def score(state: State, world: World, split: str, domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, float]]:
    """Scores per domain, plus their mean under ``"average"``."""
    per = {d: evaluate(state, world.lm, world.splits[split][d]).as_dict() for d in domains}
    per["average"] = {m: float(np.mean([per[d][m] for d in domains])) for m in SCORES}
    return per


@dataclass
class Selected:
    """A variant's dev-chosen merge: its raw record (params, the dev search, test scores) and the merge itself."""

    row: dict[str, Any]
    merged: State


def select(variant: Variant, world: World, calibration: Calibration, seed: int) -> Selected:
    """Grid search on the dev splits (mean token accuracy); the first best choice is scored on test."""
    experts = world.experts[max(world.experts)]
    search: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    for params in variant.candidates():
        merged = merge(variant, params, experts, world.base, calibration, seed)
        search.append({"params": params, "dev_token_accuracy": score(merged, world, "dev")["average"]["token_accuracy"]})
        if not best or search[-1]["dev_token_accuracy"] > best["dev_token_accuracy"]:
            best = {**search[-1], "merged": merged}
    return Selected({"params": best["params"], "search": search, "test": score(best["merged"], world, "test")}, best["merged"])


def rival(rows: dict[str, Any], candidates: tuple[str, ...]) -> str:
    """The candidate row with the best dev token accuracy (what a user choosing on dev would run)."""
    return max(candidates, key=lambda name: max(r["dev_token_accuracy"] for r in rows[name]["search"]))


def layer_attribution(ours: State, theirs: State, world: World) -> dict[str, float]:
    """Where ``ours`` gains or loses against ``theirs``, layer by layer, on the test splits.

    ``total``: ours minus theirs in mean token accuracy; ``<layer>``: theirs with
    that layer's tensors taken from ours, minus theirs. Layers that add up to the
    total act independently; a gap between them is the layers' interaction.
    """
    def accuracy(state: State) -> float:
        return score(state, world, "test")["average"]["token_accuracy"]

    reference = accuracy(theirs)
    out = {"total": accuracy(ours) - reference}
    for layer in PROJECTOR_LAYERS:
        swapped = {k: (ours[k] if layer_of(k) == layer else v) for k, v in theirs.items()}
        out[layer] = accuracy(swapped) - reference
    return out


def attributions(rows: dict[str, Any], chosen: dict[str, State], world: World) -> list[dict[str, Any]]:
    """Layer attribution of the bar's two comparisons: data-free PivotMerge against the strongest
    data-free baseline (by dev), and PivotMerge with calibration data against RegMean."""
    out = []
    for ours, theirs in (("pivotmerge", rival(rows, DATA_FREE_BASELINES)), ("pivotmerge_data", "regmean")):
        out.append({"ours": ours, "theirs": theirs,
                    "test_token_accuracy": layer_attribution(chosen[ours], chosen[theirs], world)})
    return out


def _flat_task_vector(state: State, base: State) -> torch.Tensor:
    return torch.cat([(state[k] - base[k]).reshape(-1) for k in base])


def scenarios(world: World, seed: int, methods: dict[str, Variant]) -> list[dict[str, Any]]:
    """Merge every subset of two or more domains at each training length; record distances and quality lost.

    Quality lost: the experts' mean test token accuracy on their own domains
    minus the merged projector's on the same domains (Sung et al.'s setting).
    Each method runs with its default parameters, since no search is made per scenario.
    """
    rows = []
    for steps, experts in world.experts.items():
        own = [score(e, world, "test", (d,))[d]["token_accuracy"] for e, d in zip(experts, DOMAINS)]
        for size in range(2, len(DOMAINS) + 1):
            for subset in itertools.combinations(range(len(DOMAINS)), size):
                chosen = [experts[i] for i in subset]
                domains = tuple(DOMAINS[i] for i in subset)
                distance = metrics.pairwise([_flat_task_vector(e, world.base) for e in chosen])
                loss = {}
                for name, variant in methods.items():
                    merged = merge(variant, dict(variant.fixed), chosen, world.base, None, seed)
                    acc = score(merged, world, "test", domains)["average"]["token_accuracy"]
                    loss[name] = float(np.mean([own[i] for i in subset])) - acc
                rows.append({"seed": seed, "steps": steps, "domains": domains, "metrics": distance, "quality_loss": loss})
    return rows


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Spearman rho between each metric and each method's quality loss, over all scenarios."""
    out: dict[str, dict[str, float]] = {}
    for method in rows[0]["quality_loss"]:
        loss = [r["quality_loss"][method] for r in rows]
        out[method] = {m: float(spearmanr([r["metrics"][m] for r in rows], loss).statistic) for m in rows[0]["metrics"]}
    return out


def run_seed(cfg: Config, seed: int, progress: Progress) -> dict[str, Any]:
    world = build_world(cfg, seed, progress)
    experts = world.experts[cfg.expert_steps]
    progress("calibrating")
    calibration = calibrate(experts, world.base, world.lm, list(world.splits["calib"].values()))
    # The shared initialisation itself: where a merge lands with every update scaled to nothing.
    rows: dict[str, Any] = {"base": {"test": score(world.base, world, "test")}}
    rows.update({f"expert_{d}": {"test": score(e, world, "test")} for d, e in zip(DOMAINS, experts)})
    rows["joint"] = {"test": score(world.joint, world, "test")}
    rows["task_vector_oracle"] = {"test": score(task_vector_oracle(experts, world.base, world.joint), world, "test")}
    chosen: dict[str, State] = {}
    for variant in VARIANTS:
        progress(f"merging: {variant.name}")
        selected = select(variant, world, calibration, seed)
        rows[variant.name], chosen[variant.name] = selected.row, selected.merged
    progress("layer attribution")
    layers = attributions(rows, chosen, world)
    progress("merge-success scenarios")
    scenario_methods = {v.name: v for v in VARIANTS if v.name in ("linear", "pivotmerge")}
    return {"seed": seed, "rows": rows, "alignment": calibration.alignment, "layer_attribution": layers,
            "scenarios": scenarios(world, seed, scenario_methods)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every row x domain x score."""
    table: dict[str, Any] = {}
    for name in runs[0]["rows"]:
        table[name] = {}
        for domain in (*DOMAINS, "average"):
            table[name][domain] = {}
            for m in SCORES:
                values = [r["rows"][name]["test"][domain][m] for r in runs]
                table[name][domain][m] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    return table


def run(cfg: Config, out: Path, progress: Progress, threads: int = 1) -> dict[str, Any]:
    """Run every seed and write the outputs to ``out``.

    One thread by default: the models are tiny, so extra threads mostly spin, and
    on a shared machine oversubscribed threads made training several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, out, progress)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: Config, out: Path, progress: Progress) -> dict[str, Any]:
    start = time.perf_counter()
    runs = [run_seed(cfg, seed, lambda m, s=seed: progress(f"seed {s + 1}/{cfg.seeds}: {m}")) for seed in range(cfg.seeds)]
    result = {
        "config": asdict(cfg),
        "domains": list(DOMAINS),
        "table": summarize(runs),
        "spearman": correlations([s for r in runs for s in r["scenarios"]]),
        "layer_attribution": [r["layer_attribution"] for r in runs],
        "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }
    write(result, runs, out)
    return result


def write(result: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> None:
    from pivotmerge.bench.tables import markdown, plot  # matplotlib is only needed here

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "raw_scores.json").write_text(json.dumps(runs, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "accuracy_by_domain.png")
