"""How fast a tuning trial is: one projector merge plus its dev evaluation, on the example models.

A trial (pivotmerge.tune.trials.TrialRunner) merges in memory from inputs read once and scores the
merge with the evaluation model loaded once, only the merged tensors swapped in. For reference, the
same trial done the plain way: `merge` to disk, then `evaluate_model` on the written folder.

    PYTHONPATH=. python benchmarks/tune_speed.py [--size tiny|small] [--samples 16] [--repeats 5] [--threads 2]

Prints a markdown table (median seconds per trial, split into merge and evaluation) and writes
benchmarks/results/tune_speed_<size>_<threads>threads.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.evaluate import evaluate_model
from pivotmerge.data.example import make_example
from pivotmerge.methods import get_method
from pivotmerge.run.engine import merge
from pivotmerge.spec.schema import spec_from_dict
from pivotmerge.tune.trials import TrialRunner

# The quality study's candidates, each at one setting.
CASES: dict[str, tuple[str, dict]] = {
    "task_arithmetic": ("task_arithmetic", {"scale": 0.7}),
    "ties": ("ties", {"scale": 0.9, "density": 0.5}),
    "tsv": ("tsv", {"scale": 0.8}),
    "iso_c": ("iso_c", {"scale": 0.9}),
    "pivotmerge": ("pivotmerge", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--samples", type=int, default=16, help="dev records per domain (3 domains)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ex = make_example(Path(tmp) / "ex", size=args.size, with_data=True, n_samples=args.samples)
        dev = [load_dataset(p) for p in ex.datasets.values()]
        spec = spec_from_dict({"method": "task_arithmetic", "base_model": str(ex.base),
                               "models": [{"model": str(e)} for e in ex.experts], "components": ["projector"],
                               "device": "cpu"})
        t0 = time.perf_counter()
        runner = TrialRunner(spec, dev, "accuracy")
        setup_s = time.perf_counter() - t0
        rows = {}
        with runner:
            for name, (method, params) in CASES.items():
                runner.run(get_method(method), params)  # warm-up: first-call costs of the method's ops
                runs = [runner.run(get_method(method), params) for _ in range(args.repeats)]
                plain = []
                for i in range(1):  # one plain run: it is the slow reference
                    t = time.perf_counter()
                    out = Path(tmp) / f"{name}-{i}"
                    merge({**spec.model_dump(mode="json"), "method": method, "parameters": params}, out)
                    evaluate_model(out, dev, device="cpu")
                    plain.append(time.perf_counter() - t)
                rows[name] = {"trial_s": statistics.median(r.seconds for r in runs),
                              "merge_s": statistics.median(r.merge_s for r in runs),
                              "evaluate_s": statistics.median(r.evaluate_s for r in runs),
                              "plain_merge_and_evaluate_s": plain[0]}
    result = {"size": args.size, "dev_records": sum(len(d.records) for d in dev), "threads": args.threads,
              "repeats": args.repeats, "setup_s": setup_s, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    print(f"example size {args.size}, {result['dev_records']} dev records (3 domains), {args.threads} threads; "
          f"setup once per study {setup_s:.2f} s\n")
    print("| method | trial s (median) | merge s | dev evaluation s | plain merge + evaluate s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['trial_s']:.3f} | {r['merge_s']:.3f} | {r['evaluate_s']:.3f} "
              f"| {r['plain_merge_and_evaluate_s']:.3f} |")
    out = Path(__file__).parent / "results" / f"tune_speed_{args.size}_{args.threads}threads.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
