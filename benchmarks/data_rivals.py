"""PivotMerge's data mode at its defaults against the data rivals, paired per seed with the rival dev chose.

RegMean and RegMean++ are tuned here by the bench's own grid search (`select`, on dev); ProDistill's search is
read from a quality run of that row alone (its merges are the slow part), so two commands give the table:

    pivotmerge bench quality --suite deep --rows prodistill --cache WORLDS --out PD
    python benchmarks/data_rivals.py --suite deep --cache WORLDS --prodistill-run PD --seeds 5 --out rivals.json

Every merge is made by `pivotmerge.merge` from a spec and scored by the bench's evaluator; test is read once per
dev-chosen merge. Prints, per seed, each row's (dev, test), the dev-chosen rival and PivotMerge minus it, and
the experts each scored on its own domain (the level a merge that distils them aims for).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from pivotmerge.bench.quality import OWN_LABEL, SUITES, Scorer, chosen_scores, interval, merged, own_domains, select
from pivotmerge.bench.variants import DEFAULTS, TUNED
from pivotmerge.bench.world import build_world

TUNED_HERE = ("regmean", "regmean_plus_plus")
RIVALS = (*TUNED_HERE, "prodistill")
OURS = "pivotmerge_data defaults"


def run_seed(suite: str, seed: int, cache: Path, prodistill: dict[str, Any], work: Path) -> dict[str, Any]:
    world = build_world(SUITES[suite][1].world, seed, cache)
    score = Scorer(world)
    rows = {v.name: v for v in TUNED}
    out: dict[str, Any] = {"seed": seed}
    for name in TUNED_HERE:
        out[name] = chosen_scores(select(rows[name], world, score, work / name))
    out["prodistill"] = chosen_scores(prodistill)
    ours = merged(world, next(v for v in DEFAULTS if v.name == "pivotmerge_data"), {}, work / "ours")
    out[OURS] = {name: score(ours, name)["average"]["token_accuracy"] for name in ("dev", "test")}
    out["rival"] = max(RIVALS, key=lambda name: out[name]["dev"])  # the first of equals, as the bench's paired
    out["difference"] = out[OURS]["test"] - out[out["rival"]]["test"]
    experts = {f"expert_{d}": {"test": score(path, "test", (d,))} for d, path in world.experts.items()}
    out[OWN_LABEL] = {"test": own_domains(experts)["average"]["token_accuracy"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="projector")
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--prodistill-run", type=Path, required=True, help="out folder of a `--rows prodistill` run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = json.loads((args.prodistill_run / "raw_scores.json").read_text())
    searches = {run["seed"]: run["tuned"]["prodistill"] for run in (raw if isinstance(raw, list) else raw["runs"])}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            runs.append(run_seed(args.suite, seed, args.cache, searches[seed], Path(tmp) / str(seed)))
            r = runs[-1]
            print(f"seed {seed}: " + ", ".join(f"{n} {r[n]['dev']:.4f}/{r[n]['test']:.4f}" for n in (*RIVALS, OURS))
                  + f"; rival {r['rival']}, ours - rival {r['difference']:+.4f}"
                  + f"; {OWN_LABEL} {r[OWN_LABEL]['test']:.4f}", flush=True)
    differences = [r["difference"] for r in runs]
    above_experts = [r[OURS]["test"] - r[OWN_LABEL]["test"] for r in runs]
    summary = {"suite": args.suite, "runs": runs, "mean_difference": statistics.mean(differences),
               "interval95": interval(differences), "seeds_won": sum(d > 0 for d in differences),
               "means": {n: statistics.mean(r[n]["test"] for r in runs) for n in (*RIVALS, OURS, OWN_LABEL)},
               "over_experts_on_own_domains": {"mean": statistics.mean(above_experts),
                                               "interval95": interval(above_experts)}}
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"{OURS} - dev-chosen rival: mean {summary['mean_difference']:+.4f}{_interval_text(summary['interval95'])}"
          + f", won {summary['seeds_won']}/{len(runs)}; "
          + ", ".join(f"{n} {m:.4f}" for n, m in summary["means"].items()))
    over = summary["over_experts_on_own_domains"]
    print(f"{OURS} - {OWN_LABEL}: mean {over['mean']:+.4f}{_interval_text(over['interval95'])}")


def _interval_text(bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" (95% interval {bounds[0]:+.4f} to {bounds[1]:+.4f})"


if __name__ == "__main__":
    main()
