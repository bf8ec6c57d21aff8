"""Speed and memory of PivotMerge against mergekit, on the same merges, in one run.

    python benchmarks/perf.py [--params 200M] [--layers N] [--methods linear ties ...]
                              [--repeats 3] [--out perf.json] [--work DIR]

Generates a base and three experts (Llama-shaped bf16 safetensors, the language
model of a LLaVA checkpoint; mergekit has no LLaVA architecture table), then:

1. runs the same mergekit YAML with `mergekit-yaml` and with `pivotmerge merge`
   (which accepts mergekit configs), each run in its own fresh subprocess whose
   wall time and peak RSS (os.wait4's ru_maxrss) are measured the same way; the
   two tools alternate and each pair is repeated, medians reported;
2. compares the two outputs tensor by tensor (largest absolute difference);
3. times our SVD methods (tsv, pivotmerge when registered) on the same models;
4. measures the SVD methods' scaling with hidden size, exact against the
   randomized low-rank SVD, and the randomized SVD's error;
5. measures our peak RSS with N and 2N layers (it must stay flat).

Speed is measured here, never in tests; the machine is shared, so figures are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file

console = Console(width=160)
EXPERTS = 3
# mergekit computes in `dtype` and writes `out_dtype`; float32 maths is what we do, so
# the two tools run the same definition and differ only in bf16 rounding.
MERGEKIT_METHODS: dict[str, dict[str, Any]] = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}},
}
# Whole-model SVD merges take minutes with exact SVDs of the 32000 x h embeddings on
# two cores; these timings use the randomized SVD at a modest rank.
OUR_ONLY_METHODS: dict[str, dict[str, Any]] = {
    "tsv": {"svd": "randomized", "rank_fraction": 0.125},
    "pivotmerge": {"svd": "randomized", "max_rank": 128},
}
# The scaling curve keeps h/8 directions (per task for tsv), exact or randomized.
SVD_RANK_PARAMS: dict[str, Callable[[int], dict[str, Any]]] = {
    "tsv": lambda h: {"rank_fraction": 0.125},
    "pivotmerge": lambda h: {"max_rank": max(1, h // 8)},
}


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: untied embeddings and head, SwiGLU MLP, RMS norms."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    def tensors(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
            out |= {p + f"self_attn.{m}_proj.weight": (h, h) for m in "qkvo"}
            out |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
        out |= {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}
        return out

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.tensors().values())

    def config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": max(1, self.hidden // 64), "num_key_value_heads": max(1, self.hidden // 64),
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parse_count(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 200M)")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[m.group(2)])


def shape_for(params: int, hidden: int, layers: int | None, vocab: int) -> Shape:
    """The layer count that brings a model of this width closest to `params`."""
    intermediate = int(hidden * 2.75) // 64 * 64
    if layers is None:
        per_layer = Shape(hidden, intermediate, 1, vocab).params - Shape(hidden, intermediate, 0, vocab).params
        layers = max(1, round((params - Shape(hidden, intermediate, 0, vocab).params) / per_layer))
    return Shape(hidden, intermediate, layers, vocab)


def make_models(folder: Path, shape: Shape, seed: int = 0) -> list[Path]:
    """A base and EXPERTS fine-tuned-like experts (base + small dense deltas), reused when present."""
    repos = [folder / "base"] + [folder / f"expert{k}" for k in range(EXPERTS)]
    stamp = folder / "shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape) | {"seed": seed}:
        return repos
    shutil.rmtree(folder, ignore_errors=True)
    for repo in repos:
        repo.mkdir(parents=True)
        (repo / "config.json").write_text(json.dumps(shape.config(), indent=2))
    g = torch.Generator().manual_seed(seed)
    state: list[dict[str, torch.Tensor]] = [{} for _ in repos]
    for name, s in shape.tensors().items():
        base = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g).mul_(0.02)
        state[0][name] = base.to(torch.bfloat16)
        for k in range(EXPERTS):
            state[k + 1][name] = torch.randn(s, generator=g).mul_(0.002).add_(base).to(torch.bfloat16)
    for repo, tensors in zip(repos, state):
        save_file(tensors, str(repo / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(asdict(shape) | {"seed": seed}))
    return repos


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float


# Measures one command from a small process: Linux carries the exec-ing process's
# peak RSS into the child's ru_maxrss, so a child forked straight from this
# benchmark (holding generated models) would report this process's memory.
_LAUNCHER = """
import os, subprocess, sys, time
with open(sys.argv[1], "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: Sequence[str], log: Path) -> Run:
    """Run `cmd` in a fresh process; its wall time and its own peak RSS (not ours)."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), *cmd], capture_output=True, text=True, check=True)
    wall, rss_kb, rc = out.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return Run(float(wall), int(rss_kb) / 1024)  # Linux reports kilobytes


def mergekit_config(method: str, base: Path, experts: Sequence[Path]) -> dict[str, Any]:
    per_model = MERGEKIT_METHODS[method]["parameters"]
    config = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(e), "parameters": per_model} for e in experts]}
    # mergekit's linear would average a base_model in too; the soup is of the experts only.
    return config if method == "linear" else config | {"base_model": str(base)}


def our_spec(method: str, base: Path, experts: Sequence[Path], params: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": params, "dtype": "bfloat16", "device": "cpu"}


def pivotmerge_cmd(config: Path, out: Path) -> list[str]:
    return [shutil.which("pivotmerge") or "pivotmerge", "merge", str(config), "-o", str(out), "--force"]


def mergekit_cmd(config: Path, out: Path) -> list[str]:
    return [shutil.which("mergekit-yaml") or "mergekit-yaml", str(config), str(out), "--quiet"]


def output_diff(a: Path, b: Path) -> tuple[float, float]:
    """Largest |a - b| over every tensor of two output folders (in float32), and the
    fraction of elements that differ at all."""
    worst, differing, total = 0.0, 0, 0
    files_a = _tensor_files(a)
    files_b = _tensor_files(b)
    if set(files_a) != set(files_b):
        raise RuntimeError(f"{a} and {b} hold different tensor names")
    for name, fa in files_a.items():
        with safe_open(str(fa), "pt") as ha, safe_open(str(files_b[name]), "pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        diff = (x - y).abs()
        worst = max(worst, float(diff.max()))
        differing += int(torch.count_nonzero(diff))
        total += diff.numel()
    return worst, differing / total


def _tensor_files(folder: Path) -> dict[str, Path]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as h:
            out |= {n: file for n in h.keys()}
    return out


def median_run(runs: Sequence[Run]) -> Run:
    return Run(statistics.median(r.wall_s for r in runs), statistics.median(r.peak_rss_mb for r in runs))


def compare_with_mergekit(method: str, repos: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    """Alternate mergekit and ours `repeats` times on one config; medians and the output difference."""
    config = work / f"{method}.mergekit.yml"
    config.write_text(yaml.safe_dump(mergekit_config(method, repos[0], repos[1:])))
    runs: dict[str, list[Run]] = {"mergekit": [], "ours": []}
    for _ in range(repeats):
        for tool, cmd in (("mergekit", mergekit_cmd), ("ours", pivotmerge_cmd)):
            runs[tool].append(run_measured(cmd(config, work / f"out-{method}-{tool}"), work / f"{method}-{tool}.log"))
    mk, ours = median_run(runs["mergekit"]), median_run(runs["ours"])
    worst, differing = output_diff(work / f"out-{method}-ours", work / f"out-{method}-mergekit")
    return {"method": method, "mergekit": asdict(mk), "ours": asdict(ours),
            "wall_ratio": ours.wall_s / mk.wall_s, "rss_ratio": ours.peak_rss_mb / mk.peak_rss_mb,
            "max_abs_diff": worst, "differing_fraction": differing,
            "runs": {k: [asdict(r) for r in v] for k, v in runs.items()}}


def registered(method: str) -> bool:
    from pivotmerge.methods import all_methods

    return method in all_methods()


def time_ours(method: str, repos: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    spec = work / f"{method}.spec.yml"
    spec.write_text(yaml.safe_dump(our_spec(method, repos[0], repos[1:], OUR_ONLY_METHODS[method])))
    runs = [run_measured(pivotmerge_cmd(spec, work / f"out-{method}"), work / f"{method}.log") for _ in range(repeats)]
    return {"method": method, "ours": asdict(median_run(runs)), "runs": [asdict(r) for r in runs]}


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Fastest of `repeats` calls (timing noise on a shared machine only ever adds time)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def svd_curve(hidden_sizes: Sequence[int], methods: Sequence[str], device: str, repeats: int) -> list[dict[str, Any]]:
    """Time SVD methods on one (h, h) weight of EXPERTS experts, exact and randomized SVD.

    `error` is ||W_randomized - W_exact||_F / ||W_exact - W0||_F: the randomized
    SVD's error relative to the size of the merged update.
    """
    from pivotmerge.methods import get_method

    rows = []
    for h in hidden_sizes:
        g = torch.Generator().manual_seed(h)
        base = torch.randn(h, h, generator=g).mul_(0.02).to(device)
        experts = [base + torch.randn(h, h, generator=g).mul_(0.002).to(device) for _ in range(EXPERTS)]
        for name in methods:
            method = get_method(name)
            times, outs = {}, {}
            for mode in ("exact", "randomized"):
                params = method.params.model_validate({"svd": mode, **SVD_RANK_PARAMS[name](h)})

                def call() -> torch.Tensor:
                    gen = torch.Generator(device=device).manual_seed(0)
                    out = method(experts, base, [1.0] * EXPERTS, params, gen).tensor
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out

                times[mode], outs[mode] = _best_of(call, repeats)
            update = float((outs["exact"] - base).norm())
            error = float((outs["randomized"] - outs["exact"]).norm()) / max(update, 1e-30)
            rows.append({"method": name, "hidden": h, "device": device, "exact_s": times["exact"],
                         "randomized_s": times["randomized"], "randomized_rel_error": error})
    return rows


def layers_rss(args: argparse.Namespace, shape: Shape, work: Path) -> list[dict[str, Any]]:
    """Our peak RSS for task_arithmetic with N and 2N layers (streaming: it must not grow)."""
    rows = []
    for layers in (shape.layers, 2 * shape.layers):
        s = Shape(shape.hidden, shape.intermediate, layers, shape.vocab)
        repos = make_models(work / f"models-{layers}L", s)
        config = work / f"layers-{layers}.yml"
        config.write_text(yaml.safe_dump(mergekit_config("task_arithmetic", repos[0], repos[1:])))
        runs = [run_measured(pivotmerge_cmd(config, work / f"out-layers-{layers}"), work / f"layers-{layers}.log")
                for _ in range(args.repeats)]
        rows.append({"layers": layers, "params": s.params, **asdict(median_run(runs))})
    return rows


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def print_results(result: dict[str, Any]) -> None:
    table = Table(title=f"ours vs mergekit: {result['params'] / 1e6:.0f}M-parameter bf16 models, base + {EXPERTS} experts (medians)")
    for col in ("method", "mergekit s", "ours s", "wall ours/mk", "mergekit RSS MiB", "ours RSS MiB", "RSS ours/mk", "max |diff|", "differing"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result["vs_mergekit"]:
        table.add_row(r["method"], f"{r['mergekit']['wall_s']:.1f}", f"{r['ours']['wall_s']:.1f}", f"{r['wall_ratio']:.2f}",
                      f"{r['mergekit']['peak_rss_mb']:.0f}", f"{r['ours']['peak_rss_mb']:.0f}", f"{r['rss_ratio']:.2f}",
                      f"{r['max_abs_diff']:.3g}", f"{r['differing_fraction']:.2e}")
    for r in result["ours_only"]:
        table.add_row(r["method"], "-", f"{r['ours']['wall_s']:.1f}", "-", "-", f"{r['ours']['peak_rss_mb']:.0f}", "-", "-", "-")
    console.print(table)
    if result["layers_rss"]:
        t = Table(title="our peak RSS as layers double (task_arithmetic)")
        for col in ("layers", "params", "wall s", "peak RSS MiB"):
            t.add_column(col, justify="right")
        for r in result["layers_rss"]:
            t.add_row(str(r["layers"]), f"{r['params'] / 1e6:.0f}M", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
        console.print(t)
    if result["svd_curve"]:
        t = Table(title=f"SVD methods on one (h, h) weight, {EXPERTS} experts (best of repeats)")
        for col in ("method", "device", "hidden", "exact s", "randomized s", "randomized rel. error"):
            t.add_column(col, justify="right")
        for r in result["svd_curve"]:
            t.add_row(r["method"], r["device"], str(r["hidden"]), f"{r['exact_s']:.3f}", f"{r['randomized_s']:.3f}",
                      f"{r['randomized_rel_error']:.2e}")
        console.print(t)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("200M"), help="Parameters per model (default 200M).")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, help="Decoder layers (default: what reaches --params).")
    parser.add_argument("--methods", nargs="+", default=[*MERGEKIT_METHODS, *OUR_ONLY_METHODS],
                        choices=[*MERGEKIT_METHODS, *OUR_ONLY_METHODS])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--svd-sizes", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--no-layers-rss", action="store_true", help="Skip the N vs 2N layers RSS check.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pivotmerge-perf"), help="Models and outputs (reused).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    shape = shape_for(args.params, args.hidden, args.layers, args.vocab)
    console.print(f"models: {shape} = {shape.params / 1e6:.1f}M parameters each, in {args.work}")
    repos = make_models(args.work / f"models-{shape.layers}L", shape)
    result: dict[str, Any] = {"machine": machine(), "shape": asdict(shape), "params": shape.params,
                              "command": " ".join([sys.executable, *sys.argv]), "vs_mergekit": [], "ours_only": []}
    for method in args.methods:
        if method in MERGEKIT_METHODS:
            result["vs_mergekit"].append(compare_with_mergekit(method, repos, args.work, args.repeats))
        elif registered(method):
            result["ours_only"].append(time_ours(method, repos, args.work, args.repeats))
        else:
            console.print(f"[yellow]{method}: not registered in this checkout, skipped")
    svd_methods = [m for m in OUR_ONLY_METHODS if registered(m)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result["svd_curve"] = [row for d in devices for row in svd_curve(args.svd_sizes, svd_methods, d, args.repeats)]
    result["layers_rss"] = [] if args.no_layers_rss else layers_rss(args, shape, args.work)
    result["machine"]["load_avg_after"] = os.getloadavg()
    print_results(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
