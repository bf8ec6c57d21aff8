"""Speed and memory of PivotMerge against mergekit, on the same merges, in one run.

    python benchmarks/perf.py [--params 200M] [--layers N] [--methods linear ties ...]
                              [--repeats 3] [--out perf.json] [--work DIR]

Generates a base and three experts (Llama-shaped bf16 safetensors, the language
model of a LLaVA checkpoint; mergekit has no LLaVA architecture table) whose
updates are fine-tuning-like: per matrix a low-rank part with a decaying spectrum
plus dense noise holding 5% of the update's energy. Then, with the machine described:

1. the I/O floor: plain reads of the four input files and a write of one output
   of the same size;
2. runs the same mergekit YAML with `mergekit-yaml` and with `pivotmerge merge`
   (which accepts mergekit configs), each run in its own fresh subprocess whose
   wall time and peak RSS (os.wait4's ru_maxrss) are measured the same way; the
   two tools alternate and each pair is repeated, medians reported; the outputs
   are compared tensor by tensor (largest absolute difference, bytes);
3. our SVD methods (tsv, iso_c, pivotmerge) on whole models, every component,
   their wall time against our TIES, and each tensor's SVD choice from the merge
   report (exact or randomized, rank, estimated error);
4. the randomized SVD's real error against the exact SVD on the models' own
   tensors (embedding and one layer), and both timings;
5. a projector-only merge of LLaVA-named copies of the models: its time and the
   bytes it read, against copying the base;
6. our peak RSS for task_arithmetic on a 1B-parameter-shaped model against the
   200M one (streaming: it must stay flat).

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
# The SVD methods at their defaults (svd: auto), tsv with the rank rule's energy share
# (its default, 1, keeps rank_fraction directions of noise too: exact SVDs throughout).
OUR_ONLY_METHODS: dict[str, dict[str, Any]] = {
    "tsv": {"energy": 0.9},
    "iso_c": {},
    "pivotmerge": {},
}
# The experts' updates: per matrix a rank-DELTA_RANK part with singular values
# decaying as 0.8^i, plus dense noise holding NOISE_SHARE of the update's energy;
# the update's entries are about DELTA_SCALE of the weights'.
DELTA_RANK = 16
NOISE_SHARE = 0.05
DELTA_SCALE = 0.1


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


def fine_tune_like(shape: Sequence[int], scale: float, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """A fine-tuning-like update of a matrix: low-rank with a decaying spectrum, plus noise;
    entries of about `scale`."""
    m, n = shape
    spectrum = 0.8 ** torch.arange(DELTA_RANK, dtype=torch.float32, device=device)
    low = (torch.randn(m, DELTA_RANK, generator=g, device=device) * spectrum) @ torch.randn(DELTA_RANK, n, generator=g, device=device)
    noise = torch.randn(m, n, generator=g, device=device)
    noise.mul_((NOISE_SHARE / (1 - NOISE_SHARE)) ** 0.5 * low.norm() / noise.norm())
    delta = low.add_(noise)
    return delta.mul_(scale * (m * n) ** 0.5 / delta.norm())


def make_models(folder: Path, shape: Shape, seed: int = 0, llava: bool = False) -> list[Path]:
    """A base and EXPERTS fine-tuned-like experts, reused when present. With `llava`, the
    names of a LLaVA checkpoint (`language_model.` prefix) plus a two-layer projector."""
    repos = [folder / "base"] + [folder / f"expert{k}" for k in range(EXPERTS)]
    stamp = folder / "shape.json"
    recipe = asdict(shape) | {"seed": seed, "llava": llava, "deltas": [DELTA_RANK, NOISE_SHARE, DELTA_SCALE]}
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return repos
    shutil.rmtree(folder, ignore_errors=True)
    for repo in repos:
        repo.mkdir(parents=True)
        (repo / "config.json").write_text(json.dumps(llava_config(shape) if llava else shape.config(), indent=2))
    g = torch.Generator().manual_seed(seed)
    tensors = shape.tensors()
    if llava:
        tensors = {f"language_model.{n}": s for n, s in tensors.items()} | projector_tensors(shape)
    state: list[dict[str, torch.Tensor]] = [{} for _ in repos]
    for name, s in tensors.items():
        base = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g).mul_(0.02)
        state[0][name] = base.to(torch.bfloat16)
        for k in range(EXPERTS):
            delta = torch.randn(s, generator=g).mul_(0.002) if len(s) == 1 else fine_tune_like(s, 0.002, g)
            state[k + 1][name] = delta.add_(base).to(torch.bfloat16)
    for repo, named in zip(repos, state):
        save_file(named, str(repo / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(recipe))
    return repos


VISION_HIDDEN = 1024


def projector_tensors(shape: Shape) -> dict[str, tuple[int, ...]]:
    """LLaVA's projector: vision features -> hidden -> hidden."""
    h = shape.hidden
    return {"multi_modal_projector.linear_1.weight": (h, VISION_HIDDEN), "multi_modal_projector.linear_1.bias": (h,),
            "multi_modal_projector.linear_2.weight": (h, h), "multi_modal_projector.linear_2.bias": (h,)}


def llava_config(shape: Shape) -> dict[str, Any]:
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": shape.config(),
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": VISION_HIDDEN}, "torch_dtype": "bfloat16"}


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


def console_script(name: str) -> str:
    """`name` as installed beside this interpreter (a venv's own install), else from PATH:
    PATH's `pivotmerge` may belong to another checkout."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


def pivotmerge_cmd(config: Path, out: Path) -> list[str]:
    return [console_script("pivotmerge"), "merge", str(config), "-o", str(out), "--force"]


def mergekit_cmd(config: Path, out: Path) -> list[str]:
    return [console_script("mergekit-yaml"), str(config), str(out), "--quiet"]


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


def time_ours(method: str, repos: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    """Our wall time and peak RSS on a whole-model merge, and each tensor's SVD choices from its report."""
    spec = work / f"{method}.spec.yml"
    out = work / f"out-{method}"
    spec.write_text(yaml.safe_dump(our_spec(method, repos[0], repos[1:], OUR_ONLY_METHODS[method])))
    runs = [run_measured(pivotmerge_cmd(spec, out), work / f"{method}.log") for _ in range(repeats)]
    report = json.loads((out / "merge_report.json").read_text())
    return {"method": method, "ours": asdict(median_run(runs)), "runs": [asdict(r) for r in runs],
            "svd_choices": svd_choices(report)}


def svd_choices(report: dict[str, Any]) -> dict[str, Any]:
    """Per tensor, the SVD route, rank and estimated error each method recorded; and a summary."""
    per_tensor = {}
    for entry in report["layers"]:
        info = entry.get("info", {})
        choices = info.get("svd_per_task") or ([info["shared_svd"]] if "shared_svd" in info else [])
        if "sigma" in info:  # iso_c: always the exact (Gram-route) SVD of the summed update
            choices = [{"svd": "exact", "rank": info["rank"], "energy": 1.0, "error": 0.0}]
        if choices:
            per_tensor[entry["tensor"]] = choices
    flat = [c for cs in per_tensor.values() for c in cs]
    return {"per_tensor": per_tensor, "randomized": sum(c["svd"] == "randomized" for c in flat),
            "exact": sum(c["svd"] == "exact" for c in flat),
            "max_estimated_error": max((c["error"] for c in flat), default=0.0),
            "ranks": [min((c["rank"] for c in flat), default=0), max((c["rank"] for c in flat), default=0)]}


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Fastest of `repeats` calls (timing noise on a shared machine only ever adds time)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def svd_errors(repos: Sequence[Path], names: Sequence[str], methods: Sequence[str], device: str) -> list[dict[str, Any]]:
    """Each SVD method on some of the models' own tensors with `svd: exact` and at its
    benchmark settings (`svd: auto`): both timings and the real error of the latter,
    ||W_auto - W_exact||_F / ||W_exact - W0||_F (relative to the merged update)."""
    from pivotmerge.methods import get_method
    from pivotmerge.repos.model_repo import ModelRepo

    opened = [ModelRepo.open(str(r)) for r in repos]
    rows = []
    torch.set_num_threads(1)  # as the engine runs CPU maths
    for name in names:
        base, *experts = [r.get(name).to(device=device, dtype=torch.float32) for r in opened]
        for method_name in methods:
            method = get_method(method_name)
            times, outs = {}, {}
            for mode in ("exact", "auto"):
                settings = OUR_ONLY_METHODS[method_name] | ({"svd": mode} if "svd" in method.params.model_fields else {})
                params = method.params.model_validate(settings)

                def call() -> Any:
                    out = method(experts, base, [1.0] * EXPERTS, params, torch.Generator(device=device).manual_seed(0))
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out

                times[mode], outs[mode] = _best_of(call, 1)
            update = float((outs["exact"].tensor - base).norm())
            error = float((outs["auto"].tensor - outs["exact"].tensor).norm()) / max(update, 1e-30)
            rows.append({"tensor": name, "shape": list(base.shape), "method": method_name, "device": device,
                         "exact_s": times["exact"], "auto_s": times["auto"], "auto_rel_error": error,
                         "auto_choice": svd_choices({"layers": [{"tensor": name, "info": outs["auto"].info}]})["per_tensor"].get(name)})
    for r in opened:
        r.close()
    return rows


def io_floor(repos: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    """Plain reads of every input weight file and a write of one model-sized output: what
    any merge of these models must at least do (page cache as warm as for the merges)."""
    files = [f for r in repos for f in sorted(r.glob("*.safetensors"))]
    out_bytes = (repos[0] / "model.safetensors").stat().st_size
    chunk = 16 << 20
    buffer = bytearray(chunk)
    reads, writes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buffer):
                    pass
        t1 = time.perf_counter()
        with open(work / "io-floor.bin", "wb") as fh:
            for start in range(0, out_bytes, chunk):
                fh.write(memoryview(buffer)[: min(chunk, out_bytes - start)])
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        writes.append(t2 - t1)
    (work / "io-floor.bin").unlink()
    read_s, write_s = statistics.median(reads), statistics.median(writes)
    return {"read_s": read_s, "write_s": write_s, "floor_s": read_s + write_s,
            "read_bytes": sum(f.stat().st_size for f in files), "write_bytes": out_bytes}


# Runs one merge in a fresh process and prints, as JSON, its own time and the bytes it
# read (/proc/self/io rchar) from just before to just after the merge (imports excluded).
_IN_PROCESS = """
import json, sys, time
from pivotmerge.run.engine import merge
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
spec = json.loads(sys.argv[1])
r0, t0 = rchar(), time.perf_counter()
merge(spec, sys.argv[2], overwrite=True)
print(json.dumps({"merge_s": time.perf_counter() - t0, "read_bytes": rchar() - r0}))
"""


def projector_merge(shape: Shape, work: Path, repeats: int) -> dict[str, Any]:
    """A projector-only task-arithmetic merge of LLaVA-named models against copying the base."""
    repos = make_models(work / f"models-llava-{shape.layers}L", shape, llava=True)
    spec = our_spec("task_arithmetic", repos[0], repos[1:], {}) | {"components": ["projector"]}
    merges = [json.loads(subprocess.run([sys.executable, "-c", _IN_PROCESS, json.dumps(spec), str(work / "out-projector")],
                                        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
              for _ in range(repeats)]
    copies = []
    for _ in range(repeats):
        target = work / "copy-base"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        shutil.copytree(repos[0], target)
        copies.append(time.perf_counter() - t0)
    shutil.rmtree(work / "copy-base", ignore_errors=True)
    base_bytes = (repos[0] / "model.safetensors").stat().st_size
    projector_bytes = sum(2 * _numel(s) for s in projector_tensors(shape).values())
    merge_s = statistics.median(m["merge_s"] for m in merges)
    copy_s = statistics.median(copies)
    return {"merge_s": merge_s, "copy_base_s": copy_s, "extra_s": merge_s - copy_s,
            "read_bytes": statistics.median(m["read_bytes"] for m in merges), "base_bytes": base_bytes,
            "expected_read_bytes": base_bytes + EXPERTS * projector_bytes, "runs": merges, "copies": copies}


def rss_at_scale(args: argparse.Namespace, shape: Shape, big: int, work: Path) -> list[dict[str, Any]]:
    """Our peak RSS for task_arithmetic on the benchmark's models and on ones of `big` parameters
    (same width, more layers; streaming: it must not grow)."""
    rows = []
    for s in (shape, shape_for(big, shape.hidden, None, shape.vocab)):
        repos = make_models(work / f"models-{s.layers}L", s)
        config = work / f"layers-{s.layers}.yml"
        config.write_text(yaml.safe_dump(mergekit_config("task_arithmetic", repos[0], repos[1:])))
        runs = [run_measured(pivotmerge_cmd(config, work / f"out-layers-{s.layers}"), work / f"layers-{s.layers}.log")
                for _ in range(args.repeats)]
        rows.append({"layers": s.layers, "params": s.params, **asdict(median_run(runs))})
    shutil.rmtree(work / f"out-layers-{rows[-1]['layers']}", ignore_errors=True)
    return rows


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def print_results(result: dict[str, Any]) -> None:
    m = result["machine"]
    console.print(f"machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, GPU {m['cuda'] or 'none'}; {m['platform']}, Python "
                  f"{m['python']}, torch {m['torch']}; load average {m['load_avg'][0]:.1f} before, "
                  f"{m['load_avg_after'][0]:.1f} after (on {m['cpus']} cores: figures are noisy; medians of alternating runs)")
    io = result["io_floor"]
    ties = next((r["ours"]["wall_s"] for r in result["vs_mergekit"] if r["method"] == "ties"), None)
    table = Table(title=f"ours vs mergekit: {result['params'] / 1e6:.0f}M-parameter bf16 models, base + {EXPERTS} experts (medians)")
    for col in ("method", "mergekit s", "ours s", "wall ours/mk", "ours/I-O floor", "ours/our ties", "mergekit RSS MiB",
                "ours RSS MiB", "RSS ours/mk", "max |diff|", "differing", "bytes identical"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result["vs_mergekit"]:
        table.add_row(r["method"], f"{r['mergekit']['wall_s']:.1f}", f"{r['ours']['wall_s']:.1f}", f"{r['wall_ratio']:.2f}",
                      f"{r['ours']['wall_s'] / io['floor_s']:.1f}", "-",
                      f"{r['mergekit']['peak_rss_mb']:.0f}", f"{r['ours']['peak_rss_mb']:.0f}", f"{r['rss_ratio']:.2f}",
                      f"{r['max_abs_diff']:.3g}", f"{r['differing_fraction']:.2e}", "yes" if r["max_abs_diff"] == 0 else "no")
    for r in result["ours_only"]:
        table.add_row(r["method"], "-", f"{r['ours']['wall_s']:.1f}", "-", f"{r['ours']['wall_s'] / io['floor_s']:.1f}",
                      f"{r['ours']['wall_s'] / ties:.2f}" if ties else "-", "-", f"{r['ours']['peak_rss_mb']:.0f}",
                      "-", "-", "-", "-")
    console.print(table)
    console.print(f"I/O floor: read {io['read_bytes'] / 2**30:.2f} GiB in {io['read_s']:.2f} s, write "
                  f"{io['write_bytes'] / 2**30:.2f} GiB in {io['write_s']:.2f} s: {io['floor_s']:.2f} s")
    if result["ours_only"]:
        t = Table(title="SVD choices per tensor, from each merge report (svd: auto)")
        for col in ("method", "tensors", "randomized SVDs", "exact SVDs", "ranks", "max estimated error"):
            t.add_column(col, justify="right")
        for r in result["ours_only"]:
            c = r["svd_choices"]
            t.add_row(r["method"], str(len(c["per_tensor"])), str(c["randomized"]), str(c["exact"]),
                      f"{c['ranks'][0]}-{c['ranks'][1]}", f"{c['max_estimated_error']:.2e}")
        console.print(t)
    if result["svd_errors"]:
        t = Table(title="svd: auto against svd: exact on the models' own tensors (one run each)")
        for col in ("tensor", "method", "device", "exact s", "auto s", "auto route", "real rel. error"):
            t.add_column(col, justify="right")
        for r in result["svd_errors"]:
            route = ", ".join(f"{c['svd'][0]}{c['rank']}" for c in r["auto_choice"] or [])
            t.add_row(r["tensor"], r["method"], r["device"], f"{r['exact_s']:.2f}", f"{r['auto_s']:.2f}", route,
                      f"{r['auto_rel_error']:.2e}")
        console.print(t)
    p = result.get("projector")
    if p:
        console.print(f"projector-only merge (LLaVA names, in-process, imports excluded): {p['merge_s']:.2f} s; copying "
                      f"the base folder: {p['copy_base_s']:.2f} s; extra {p['extra_s']:+.2f} s; read "
                      f"{p['read_bytes'] / 2**20:.1f} MiB (base {p['base_bytes'] / 2**20:.1f} MiB + the experts' projectors: "
                      f"{p['expected_read_bytes'] / 2**20:.1f} MiB)")
    if result["rss_at_scale"]:
        t = Table(title="our peak RSS as the model grows (task_arithmetic, same width, more layers)")
        for col in ("layers", "params", "wall s", "peak RSS MiB"):
            t.add_column(col, justify="right")
        for r in result["rss_at_scale"]:
            t.add_row(str(r["layers"]), f"{r['params'] / 1e6:.0f}M", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
        console.print(t)


def markdown(result: dict[str, Any]) -> str:
    """The results as the markdown tables of docs/performance.md."""
    io = result["io_floor"]
    ties = next((r["ours"]["wall_s"] for r in result["vs_mergekit"] if r["method"] == "ties"), None)
    lines = ["| method | mergekit wall s | ours wall s | ours/mergekit | ours/I-O floor | ours/our TIES | mergekit peak RSS MiB | "
             "ours peak RSS MiB | RSS ours/mergekit | max abs diff | differing elements |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["vs_mergekit"]:
        lines.append(f"| {r['method']} | {r['mergekit']['wall_s']:.1f} | {r['ours']['wall_s']:.1f} | {r['wall_ratio']:.2f} | "
                     f"{r['ours']['wall_s'] / io['floor_s']:.1f} | - | {r['mergekit']['peak_rss_mb']:.0f} | "
                     f"{r['ours']['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['max_abs_diff']:.3g} | "
                     f"{100 * r['differing_fraction']:.2f}% |")
    for r in result["ours_only"]:
        lines.append(f"| {r['method']} | - | {r['ours']['wall_s']:.1f} | - | {r['ours']['wall_s'] / io['floor_s']:.1f} | "
                     f"{r['ours']['wall_s'] / ties:.2f} | - | {r['ours']['peak_rss_mb']:.0f} | - | - | - |" if ties else "")
    lines += ["", f"I/O floor: reading the four inputs ({io['read_bytes'] / 2**30:.2f} GiB) {io['read_s']:.2f} s, writing one "
                  f"output ({io['write_bytes'] / 2**30:.2f} GiB) {io['write_s']:.2f} s: {io['floor_s']:.2f} s.", ""]
    if result["ours_only"]:
        lines += ["| method | tensors with SVDs | randomized SVDs | exact SVDs | ranks | max estimated error |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["ours_only"]:
            c = r["svd_choices"]
            lines.append(f"| {r['method']} | {len(c['per_tensor'])} | {c['randomized']} | {c['exact']} | "
                         f"{c['ranks'][0]}-{c['ranks'][1]} | {c['max_estimated_error']:.1e} |")
        lines.append("")
    if result["svd_errors"]:
        lines += ["| tensor | method | exact s | auto s | auto route (e/r + rank) | real error vs exact |", "|---|---|---:|---:|---|---:|"]
        for r in result["svd_errors"]:
            route = ", ".join(f"{c['svd'][0]}{c['rank']}" for c in r["auto_choice"] or [])
            lines.append(f"| {r['tensor']} ({r['shape'][0]} x {r['shape'][1]}) | {r['method']} | {r['exact_s']:.2f} | "
                         f"{r['auto_s']:.2f} | {route} | {r['auto_rel_error']:.1e} |")
        lines.append("")
    p = result.get("projector")
    if p:
        lines += [f"Projector-only merge: {p['merge_s']:.2f} s in-process (copying the base folder: {p['copy_base_s']:.2f} s; "
                  f"extra {p['extra_s']:+.2f} s); read {p['read_bytes'] / 2**20:.1f} MiB = the base "
                  f"({p['base_bytes'] / 2**20:.1f} MiB) + the experts' projectors (expected total "
                  f"{p['expected_read_bytes'] / 2**20:.1f} MiB).", ""]
    if result["rss_at_scale"]:
        lines += ["| layers | parameters per model | wall s | peak RSS MiB |", "|---:|---:|---:|---:|"]
        for r in result["rss_at_scale"]:
            lines.append(f"| {r['layers']} | {r['params'] / 1e6:.0f}M | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("200M"), help="Parameters per model (default 200M).")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, help="Decoder layers (default: what reaches --params).")
    parser.add_argument("--methods", nargs="+", default=["ties", *OUR_ONLY_METHODS, "linear", "task_arithmetic"],
                        choices=[*MERGEKIT_METHODS, *OUR_ONLY_METHODS])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--svd-tensors", nargs="*", default=["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                                               "model.embed_tokens.weight"],
                        help="Tensors on which svd: auto is checked against svd: exact (none: skip).")
    parser.add_argument("--rss-params", type=parse_count, default=parse_count("1B"),
                        help="Size of the larger model of the RSS check (0: skip).")
    parser.add_argument("--no-projector", action="store_true", help="Skip the projector-only merge.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pivotmerge-perf"), help="Models and outputs (reused).")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--markdown", type=Path, help="Print the markdown tables of a saved JSON result and stop.")
    args = parser.parse_args(argv)
    if args.markdown:
        result = json.loads(args.markdown.read_text())
        print(markdown(result))
        return result

    args.work.mkdir(parents=True, exist_ok=True)
    shape = shape_for(args.params, args.hidden, args.layers, args.vocab)
    console.print(f"models: {shape} = {shape.params / 1e6:.1f}M parameters each, in {args.work}")
    result: dict[str, Any] = {"machine": machine(), "shape": asdict(shape), "params": shape.params,
                              "command": " ".join([sys.executable, *sys.argv]), "vs_mergekit": [], "ours_only": []}
    repos = make_models(args.work / f"models-{shape.layers}L", shape)

    def checkpoint() -> None:
        """Save what has been measured so far: a run cut short keeps its finished stages."""
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["io_floor"] = io_floor(repos, args.work, args.repeats)
    result["svd_errors"], result["projector"], result["rss_at_scale"] = [], None, []
    # TIES first: the SVD methods' target is relative to it.
    for method in sorted(args.methods, key=lambda m: m != "ties"):
        if method in MERGEKIT_METHODS:
            result["vs_mergekit"].append(compare_with_mergekit(method, repos, args.work, args.repeats))
        else:
            result["ours_only"].append(time_ours(method, repos, args.work, args.repeats))
        checkpoint()
    svd_methods = [m for m in args.methods if m in OUR_ONLY_METHODS]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in args.svd_tensors:
        result["svd_errors"] += [row for d in devices for row in svd_errors(repos, [name], svd_methods, d)]
        checkpoint()
    if not args.no_projector:
        result["projector"] = projector_merge(shape, args.work, args.repeats)
        checkpoint()
    if args.rss_params:
        result["rss_at_scale"] = rss_at_scale(args, shape, args.rss_params, args.work)
    result["machine"]["load_avg_after"] = os.getloadavg()
    print_results(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
