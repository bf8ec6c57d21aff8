"""The quality benchmark, through the product: `pivotmerge.merge` on LLaVA folders, the evaluator's scores.

Two suites (SUITES), the same rows and gates: `projector`, whose alignment trained
the projector alone, and `deep`, whose alignment also trained the language model
and the vision tower's top layers, so its merges span every layer (the spec's
`components` are what the world's alignment trained).

Per seed: build (or read from the cache) the world of `pivotmerge/bench/world.py`;
score the shared initialisation, every expert and the joint model; merge the
experts with every tuned row, each candidate of its grid scored on the dev
splits (the search recorded) and the dev-chosen merge once on the test splits;
merge every row again at its defaults and score that on test. Then per seed:
the paired differences of the bar, a layer attribution of PivotMerge against
its rivals, and the merge-success scenarios (domain subsets) for the Spearman
study of the distance metrics.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr, t as student_t

from pivotmerge.analysis import metrics
from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.variants import (DATA_BASELINES, DATA_FREE_BASELINES, DEFAULTS, QUICK_ROWS, TUNED, Variant)
from pivotmerge.bench.threads import torch_threads
from pivotmerge.bench.world import Config, World, build_world
from pivotmerge.data.evaluate import CaptionBatch, caption_batches, caption_stats, load_model
from pivotmerge.run.merge import merge

Progress = Callable[[str], None]
PROJECTOR = "model.multi_modal_projector."
PROJECTOR_LAYERS = ("linear_1", "linear_2")


@dataclass(frozen=True)
class Suite:
    world: Config
    seeds: int
    quick: bool = False  # quick mode runs `quick_rows` only
    quick_rows: tuple[str, ...] = QUICK_ROWS
    rows: tuple[str, ...] | None = None  # only these rows are merged (the reference rows are always scored)
    # The parts a layer attribution swaps between merges, each as the tensor-name prefixes it covers;
    # together they cover what the suite merges.
    parts: tuple[tuple[str, tuple[str, ...]], ...] = tuple((layer, (f"{PROJECTOR}{layer}.",)) for layer in PROJECTOR_LAYERS)
    scenarios: bool = True  # merge every domain subset for the Spearman study of the distance metrics

    def runs(self, row: str) -> bool:
        return (not self.quick or row in self.quick_rows) and (self.rows is None or row in self.rows)

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(p for _, prefixes in self.parts for p in prefixes)


# One world recipe for both modes: quick mode is the full run's first seed with the gate rows only,
# so a full run reuses the world a quick run cached.
WORLD = Config(n_train=200, n_dev=48, n_test=96, n_calib=32, vision_steps=200, lm_steps=400, expert_steps=200)
QUICK = Suite(WORLD, seeds=1, quick=True)
FULL = Suite(WORLD, seeds=5)
# The deep suite: alignment also trains the whole language model and the tower's top layers, so a merge
# spans every layer of a deeper Llama (6 layers) and a CLIP tower (4 layers, the 2 that feed the projector
# train). Attribution swaps whole components; the Spearman scenarios (every domain subset merged, which would
# double the suite's time) stay with the projector suite.
DEEP_WORLD = replace(WORLD, vision_layers=4, text_layers=6, trains=("projector", "language_model", "vision_tower"))
COMPONENTS = (("projector", (PROJECTOR,)), ("language_model", ("model.language_model.", "lm_head.")),
              ("vision_tower", ("model.vision_tower.",)))
# Quick mode (CI) builds a world of half the steps: 74 s of CPU instead of 126 s, and its gates hold (seed 0:
# specialisation +0.29, task arithmetic over the base +0.17, the joint model over task arithmetic +0.27).
DEEP_QUICK_WORLD = replace(DEEP_WORLD, vision_steps=100, lm_steps=200, expert_steps=100)
# Its rows leave out `pivotmerge_data`, whose dev grid is the alignment fit: on this world that grid took
# 9 of the quick run's 11 minutes, and the projector suite's quick mode keeps the row.
DEEP_QUICK = Suite(DEEP_QUICK_WORLD, seeds=1, quick=True, parts=COMPONENTS, scenarios=False,
                   quick_rows=tuple(r for r in QUICK_ROWS if r != "pivotmerge_data"))
DEEP = Suite(DEEP_WORLD, seeds=5, parts=COMPONENTS, scenarios=False)
SUITES = {"projector": (QUICK, FULL), "deep": (DEEP_QUICK, DEEP)}  # name -> (quick, full)


def with_average(per: dict[str, dict[str, float]], domains: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per-domain scores with their mean over `domains` as the "average" row."""
    per["average"] = {m: float(np.mean([per[d][m] for d in domains])) for m in ("token_accuracy", "caption_loss")}
    return per


class Scorer:
    """The evaluator's caption scores of model folders on a world's splits.

    Every folder of a world shares one processor, so each split is tokenised once
    (`caption_batches`) and each model is loaded (`load_model`) and scored
    (`caption_stats`) by the project's evaluation code.
    """

    def __init__(self, world: World, batch_size: int = 64) -> None:
        processor = load_model(world.base, "cpu").processor
        self._batches: dict[str, dict[str, list[CaptionBatch]]] = {
            split: {d.name: caption_batches(processor, d.records, batch_size) for d in world.datasets(split)}
            for split in ("dev", "test")}

    def __call__(self, model_dir: Path, split: str, domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, float]]:
        loaded = load_model(model_dir, "cpu")
        per = {}
        for d in domains:
            stats = caption_stats(loaded.model, self._batches[split][d], loaded.device)
            per[d] = {"token_accuracy": stats.accuracy, "caption_loss": stats.loss}
        return with_average(per, domains)


def spec_for(world: World, variant: Variant, params: dict[str, Any], domains: tuple[str, ...] = DOMAINS) -> dict[str, Any]:
    """A user's merge spec for `variant` with `params` over the experts of `domains`."""
    models = []
    for d in domains:
        entry: dict[str, Any] = {"model": str(world.experts[d])}
        if variant.data:
            entry["calibration"] = {"dataset": str(world.dataset("calib", d))}
        models.append(entry)
    return {"method": variant.method, "base_model": str(world.base), "models": models,
            "components": world.config.merge_components(), "parameters": params, "device": "cpu", "seed": 0}


def merged(world: World, variant: Variant, params: dict[str, Any], out: Path,
           domains: tuple[str, ...] = DOMAINS) -> Path:
    merge(spec_for(world, variant, params, domains), out, overwrite=True)
    return out


def timed_merge(world: World, variant: Variant, params: dict[str, Any], out: Path) -> tuple[Path, dict[str, float]]:
    """`merged(...)` and what it took: wall seconds, and CPU seconds of this process (all its threads;
    on a busy machine the closer measure of what a quiet one would take)."""
    wall, cpu = time.perf_counter(), time.process_time()
    path = merged(world, variant, params, out)
    return path, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def select(variant: Variant, world: World, score: Scorer, work: Path) -> dict[str, Any]:
    """Grid search on the dev splits (mean token accuracy); the first best is kept at `work/chosen` and scored on test."""
    search: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    chosen, candidate = work / "chosen", work / "candidate"
    for params in variant.candidates():
        _, seconds = timed_merge(world, variant, params, candidate)
        search.append({"params": params, "dev_token_accuracy": score(candidate, "dev")["average"]["token_accuracy"],
                       "merge_seconds": seconds})
        if best is None or search[-1]["dev_token_accuracy"] > best["dev_token_accuracy"]:
            best = search[-1]
            shutil.rmtree(chosen, ignore_errors=True)
            candidate.rename(chosen)
    shutil.rmtree(candidate, ignore_errors=True)
    assert best is not None
    return {"params": best["params"], "search": search, "test": score(chosen, "test")}


def with_part(theirs: Path, ours: Path, prefixes: tuple[str, ...], out: Path) -> Path:
    """`theirs` with the tensors named by `prefixes` taken from `ours` (both single-file folders)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(theirs, out)
    mine, state = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    state.update({k: v for k, v in mine.items() if k.startswith(prefixes)})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def layer_attribution(suite: Suite, ours: Path, theirs: Path, score: Scorer, work: Path) -> dict[str, float]:
    """``total``: ours minus theirs in mean test token accuracy; ``<part>``: theirs with that part
    (a projector layer, or a component) taken from ours, minus theirs. Parts adding up to the total act independently."""
    def accuracy(path: Path) -> float:
        return score(path, "test")["average"]["token_accuracy"]

    reference = accuracy(theirs)
    out = {"total": accuracy(ours) - reference}
    for part, prefixes in suite.parts:
        out[part] = accuracy(with_part(theirs, ours, prefixes, work / "swapped")) - reference
    return out


def best_dev(search: dict[str, Any]) -> float:
    """The best dev token accuracy of a grid search as `select` records it."""
    return max(r["dev_token_accuracy"] for r in search["search"])


def chosen_scores(search: dict[str, Any]) -> dict[str, Any]:
    """A `select` record in short: the dev-chosen parameters, their dev and test token accuracy."""
    return {"params": search["params"], "dev": best_dev(search), "test": search["test"]["average"]["token_accuracy"]}


def rival(rows: dict[str, Any], candidates: tuple[str, ...]) -> str:
    """The candidate with the best dev token accuracy (what a user choosing on dev would run)."""
    return max(candidates, key=lambda name: best_dev(rows[name]))


def _task_vector(path: Path, base: dict[str, torch.Tensor]) -> torch.Tensor:
    state = load_file(path / "model.safetensors")
    return torch.cat([(state[k] - base[k]).reshape(-1) for k in sorted(base)])


def scenarios(suite: Suite, world: World, score: Scorer, own: dict[str, float], work: Path,
              seed: int) -> list[dict[str, Any]]:
    """Merge every subset of two or more domains' experts at defaults; record distances and quality lost.

    Quality lost: the experts' mean test token accuracy on their own domains minus
    the merge's on the same domains (Sung et al.'s setting).
    """
    base = {k: v for k, v in load_file(world.base / "model.safetensors").items() if k.startswith(suite.prefixes)}
    vectors = {d: _task_vector(world.experts[d], base) for d in DOMAINS}
    rows = []
    for size in range(2, len(DOMAINS) + 1):
        for domains in itertools.combinations(DOMAINS, size):
            loss = {}
            for method in ("task_arithmetic", "pivotmerge"):
                path = merged(world, Variant(method, method), {}, work / "scenario", domains)
                acc = score(path, "test", domains)["average"]["token_accuracy"]
                loss[method] = float(np.mean([own[d] for d in domains])) - acc
            rows.append({"seed": seed, "domains": domains, "metrics": metrics.pairwise([vectors[d] for d in domains]),
                         "quality_loss": loss})
    return rows


def correlations(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Spearman rho between each metric and each method's quality loss, over all scenarios (none: empty)."""
    if not rows:
        return {}
    return {method: {m: float(spearmanr([r["metrics"][m] for r in rows], [r["quality_loss"][method] for r in rows]).statistic)
                     for m in rows[0]["metrics"]}
            for method in rows[0]["quality_loss"]}


# The reference row of each expert scored on its own domain: the level a merge that distils the experts
# (RegMean's fit, ProDistill, the alignment fit) aims for; a data-mode bar above it asks the merge to beat
# the experts at their own domains.
OWN_DOMAINS = "experts_on_own_domains"
OWN_LABEL = "experts on their own domains"


def own_domains(reference: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per domain, its own expert's test scores; their mean as the average."""
    return with_average({d: dict(reference[f"expert_{d}"]["test"][d]) for d in DOMAINS}, DOMAINS)


def run_seed(suite: Suite, seed: int, cache: Path, work: Path, progress: Progress) -> dict[str, Any]:
    world = build_world(suite.world, seed, cache, progress)
    score = Scorer(world)
    progress("scoring the shared initialisation, the experts and the joint model")
    reference = {"base": {"test": score(world.base, "test")}}
    reference.update({f"expert_{d}": {"test": score(p, "test")} for d, p in world.experts.items()})
    reference["joint"] = {"test": score(world.joint, "test")}
    reference[OWN_DOMAINS] = {"test": own_domains(reference)}
    tuned: dict[str, Any] = {}
    for variant in (v for v in TUNED if suite.runs(v.name)):
        progress(f"tuning on dev: {variant.name}")
        tuned[variant.name] = select(variant, world, score, work / "tuned" / variant.name)
    defaults: dict[str, Any] = {}
    for variant in (v for v in DEFAULTS if suite.runs(v.name)):
        progress(f"at defaults: {variant.name}")
        path, seconds = timed_merge(world, variant, dict(variant.fixed), work / "defaults" / variant.name)
        defaults[variant.name] = {"params": dict(variant.fixed), "test": score(path, "test"), "merge_seconds": seconds}
    progress("layer attribution")
    chosen = {name: work / "tuned" / name / "chosen" for name in tuned}
    attribution = []
    free = tuple(n for n in DATA_FREE_BASELINES if n in tuned)
    for ours, theirs in (("pivotmerge", rival(tuned, free) if free else None), ("pivotmerge_data", "regmean_plus_plus")):
        if ours in tuned and theirs in tuned:
            attribution.append({"ours": ours, "theirs": theirs,
                                "test_token_accuracy": layer_attribution(suite, chosen[ours], chosen[theirs], score, work)})
    found: list[dict[str, Any]] = []
    if suite.scenarios and suite.rows is None:  # the scenarios merge rows of their own: a run of chosen rows leaves them out
        progress("merge-success scenarios")
        own = {d: reference[f"expert_{d}"]["test"][d]["token_accuracy"] for d in DOMAINS}
        found = scenarios(suite, world, score, own, work, seed)
    return {"seed": seed, "world": str(world.root), "reference": reference, "tuned": tuned, "defaults": defaults,
            "layer_attribution": attribution, "scenarios": found}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(runs: list[dict[str, Any]], section: str) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every row x domain x score of one section."""
    return {name: {d: {m: _stats([r[section][name]["test"][d][m] for r in runs]) for m in ("token_accuracy", "caption_loss")}
                   for d in (*DOMAINS, "average")}
            for name in runs[0][section]}


def merge_seconds(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per row, the mean seconds of one merge (wall and CPU) over every tuned candidate and seed, and at
    defaults where the row has one."""
    out = {}
    for name in runs[0]["tuned"]:
        merges = [s["merge_seconds"] for r in runs for s in r["tuned"][name]["search"]]
        merges += [r["defaults"][name]["merge_seconds"] for r in runs if name in r["defaults"]]
        out[name] = {clock: float(np.mean([m[clock] for m in merges])) for clock in ("wall", "cpu")}
    return out


def _avg(row: dict[str, Any]) -> float:
    return row["test"]["average"]["token_accuracy"]


def interval(per_seed: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of paired per-seed differences; None under two seeds. Seeds are
    whole worlds, so this says whether the suite resolves a difference, not only whether it was won."""
    n = len(per_seed)
    if n < 2:
        return None
    mean, half = float(np.mean(per_seed)), 0.0
    spread = float(np.std(per_seed, ddof=1))
    if spread > 0:
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * spread / n ** 0.5
    return mean - half, mean + half


def paired(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bar's comparisons, per seed, in mean test token accuracy, with the mean's 95% interval."""
    def diff(label: str, ours: Callable[[dict], float], theirs: Callable[[dict], float]) -> dict[str, Any]:
        per_seed = [ours(r) - theirs(r) for r in runs]
        return {"comparison": label, "per_seed": per_seed, "mean": float(np.mean(per_seed)),
                "interval95": interval(per_seed), "wins": sum(d > 0 for d in per_seed)}

    def tuned(name: str) -> Callable[[dict], float]:
        return lambda r: _avg(r["tuned"][name])

    def default(name: str) -> Callable[[dict], float]:
        return lambda r: _avg(r["defaults"][name])

    def best_free(r: dict[str, Any]) -> float:
        present = tuple(n for n in DATA_FREE_BASELINES if n in r["tuned"])
        return _avg(r["tuned"][rival(r["tuned"], present)])

    def best_data(r: dict[str, Any]) -> float:
        present = tuple(n for n in DATA_BASELINES if n in r["tuned"])
        return _avg(r["tuned"][rival(r["tuned"], present)])

    def own(r: dict[str, Any]) -> float:
        return _avg(r["reference"][OWN_DOMAINS])

    names, default_names = runs[0]["tuned"], runs[0]["defaults"]
    out = []
    if "pivotmerge" in names and any(b in names for b in DATA_FREE_BASELINES):
        out.append(diff("pivotmerge - best data-free baseline (dev-chosen per seed)", tuned("pivotmerge"), best_free))
        if "pivotmerge" in default_names:
            out.append(diff("pivotmerge defaults - best data-free baseline (dev-chosen per seed)", default("pivotmerge"),
                            best_free))
        out += [diff(f"pivotmerge - {b}", tuned("pivotmerge"), tuned(b)) for b in DATA_FREE_BASELINES if b in names]
    if "pivotmerge_data" in names and any(b in names for b in DATA_BASELINES):
        label = "best data baseline (dev-chosen per seed)"
        out.append(diff(f"pivotmerge_data - {label}", tuned("pivotmerge_data"), best_data))
        if "pivotmerge_data" in default_names:
            out.append(diff(f"pivotmerge_data defaults - {label}", default("pivotmerge_data"), best_data))
    if "pivotmerge_data" in names:
        out.append(diff(f"pivotmerge_data - {OWN_LABEL}", tuned("pivotmerge_data"), own))
    if any(b in names for b in DATA_BASELINES):
        out.append(diff(f"best data baseline (dev-chosen per seed) - {OWN_LABEL}", best_data, own))
    if {"pivotmerge_data", "regmean_plus_plus"} <= set(names):
        out.append(diff("pivotmerge_data - regmean_plus_plus", tuned("pivotmerge_data"), tuned("regmean_plus_plus")))
    for name, label in (("pivotmerge", "pivotmerge defaults"),
                        ("pivotmerge_data", "pivotmerge_data defaults (calibration, no parameters)")):
        if name in names and name in default_names:
            out.append(diff(f"{label} - {name} tuned", default(name), tuned(name)))
    for name in names:
        full = name.split(" - ")[0]
        if (name.startswith("pivotmerge - ") or name.startswith("pivotmerge_data - ")) and full in names:
            out.append(diff(f"({name}) - {full}", tuned(name), tuned(full)))
    return out


def gates(result: dict[str, Any]) -> dict[str, float]:
    """The margins the suite must keep to be informative (tests/bench assert them)."""
    ref, tuned = result["reference"], result["tuned"]
    acc = lambda row, d="average": row[d]["token_accuracy"]["mean"]  # noqa: E731
    specialisation = min(acc(ref[f"expert_{d}"], d) - max(acc(ref[f"expert_{o}"], d) for o in DOMAINS if o != d)
                         for d in DOMAINS)
    out = {"expert_specialisation": specialisation}
    if "task_arithmetic" in tuned:  # a run of chosen rows may leave it out
        out["task_arithmetic_over_base"] = acc(tuned["task_arithmetic"]) - acc(ref["base"])
        out["joint_over_task_arithmetic"] = acc(ref["joint"]) - acc(tuned["task_arithmetic"])
    return out


def run(suite: Suite, out: Path, cache: Path, progress: Progress, threads: int = 1) -> dict[str, Any]:
    """Run every seed and write results.md, results.json, raw_scores.json and the plot to `out`.

    One torch thread by default: the models are tiny, and on a shared machine
    extra threads mostly spin.
    """
    start = time.perf_counter()
    runs = []
    with torch_threads(threads):
        for seed in range(suite.seeds):
            work = out / "work"
            runs.append(run_seed(suite, seed, cache, work,
                                 lambda m, s=seed: progress(f"seed {s + 1}/{suite.seeds}: {m}")))
            shutil.rmtree(work, ignore_errors=True)
    result = summary(suite, runs, time.perf_counter() - start)
    write(result, runs, out)
    return result


def summary(suite: Suite, runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The summary of `run_seed`'s `runs`: tables, paired differences, merge times, gates."""
    result = {
        "suite": {**asdict(suite), "world": asdict(suite.world)},
        "domains": list(DOMAINS),
        "reference": summarize(runs, "reference"),
        "tuned": summarize(runs, "tuned"),
        "defaults": summarize(runs, "defaults"),
        "paired": paired(runs),
        "spearman": correlations([s for r in runs for s in r["scenarios"]]),
        "layer_attribution": [r["layer_attribution"] for r in runs],
        "merge_seconds": merge_seconds(runs),
        "seconds": seconds,
    }
    result["gates"] = gates(result)
    return result


def write(result: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> None:
    from pivotmerge.bench.tables import markdown, plot  # matplotlib is only needed here

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "raw_scores.json").write_text(json.dumps(runs, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "accuracy_by_domain.png")


def with_seeds(suite: Suite, seeds: int | None) -> Suite:
    return suite if seeds is None else replace(suite, seeds=seeds)


ROW_NAMES = tuple(dict.fromkeys(v.name for v in (*TUNED, *DEFAULTS)))


def with_rows(suite: Suite, rows: tuple[str, ...] | None) -> Suite:
    """`suite` merging only `rows` (tuned and defaults rows of those names); an unknown name is an error naming it."""
    if rows is None:
        return suite
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise ValueError(f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(ROW_NAMES)}")
    return replace(suite, rows=rows)
