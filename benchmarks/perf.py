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
   wall time, CPU time and peak RSS (os.wait4's rusage) are measured the same
   way; the two tools alternate and each pair is repeated, medians reported;
   the outputs are compared tensor by tensor (largest absolute difference,
   bytes); our merge report's own timings (waiting for reads, for the maths,
   for writes), a profiled merge (each thread's CPU, the tensor merges' heaviest
   functions) and each tool's start-up (importing it, in a fresh process, with
   `-X importtime`'s breakdown) show where the time goes;
3. our SVD methods (tsv, iso_c, pivotmerge) on whole models, every component,
   their wall time against our TIES, and each tensor's SVD choice from the merge
   report (exact or randomized, rank, estimated error);
4. the randomized SVD's real error against the exact SVD on the models' own
   tensors (embedding and one layer), and both timings;
5. a projector-only merge of LLaVA-named copies of the models: its time and the
   bytes it read, against copying the base;
6. our peak RSS for task_arithmetic on a 1B-parameter-shaped model against the
   200M one (streaming: it must stay flat);
7. the issue's targets (issue 17), each met or missed, with its figure.

Both tools start from bytecode: mergekit's is compiled at install, and this
checkout's is compiled first (an editable install under PYTHONDONTWRITEBYTECODE
would otherwise compile every module on every start).

Speed is measured here, never in tests; the machine is shared, so figures are medians.
"""

from __future__ import annotations

import argparse
import compileall
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

console = Console(width=200)
EXPERTS = 3
# mergekit computes in `dtype` and writes `out_dtype`; float32 maths is what we do, so
# the two tools run the same definition and differ only in bf16 rounding.
MERGEKIT_METHODS: dict[str, dict[str, Any]] = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5}},
}
# Random methods (DARE drops entries at random): the tools' outputs cannot agree.
RANDOM_METHODS = {"dare_ties"}
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
    cpu_s: float  # user + system, all threads
    load: float  # 1-minute load average when the run started


# Measures one command from a small process: Linux carries the exec-ing process's
# peak RSS into the child's ru_maxrss, so a child forked straight from this
# benchmark (holding generated models) would report this process's memory.
_LAUNCHER = """
import os, subprocess, sys, time
with open(sys.argv[1], "wb") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: Sequence[str], log: Path) -> Run:
    """Run `cmd` in a fresh process; its wall time, CPU time and its own peak RSS (not ours)."""
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), *cmd], capture_output=True, text=True, check=True)
    wall, rss_kb, cpu, rc = out.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}")
    return Run(float(wall), int(rss_kb) / 1024, float(cpu), load)  # Linux reports kilobytes


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
    return Run(*(statistics.median(getattr(r, f) for r in runs) for f in ("wall_s", "peak_rss_mb", "cpu_s", "load")))


def compare_with_mergekit(method: str, repos: Sequence[Path], work: Path, repeats: int) -> dict[str, Any]:
    """Alternate mergekit and ours `repeats` times on one config; medians, the output difference
    and our last run's own timings (from its merge report)."""
    config = work / f"{method}.mergekit.yml"
    config.write_text(yaml.safe_dump(mergekit_config(method, repos[0], repos[1:])))
    runs: dict[str, list[Run]] = {"mergekit": [], "ours": []}
    for _ in range(repeats):
        for tool, cmd in (("mergekit", mergekit_cmd), ("ours", pivotmerge_cmd)):
            runs[tool].append(run_measured(cmd(config, work / f"out-{method}-{tool}"), work / f"{method}-{tool}.log"))
    mk, ours = median_run(runs["mergekit"]), median_run(runs["ours"])
    worst, differing = output_diff(work / f"out-{method}-ours", work / f"out-{method}-mergekit")
    report = json.loads((work / f"out-{method}-ours" / "merge_report.json").read_text())
    return {"method": method, "mergekit": asdict(mk), "ours": asdict(ours),
            "wall_ratio": ours.wall_s / mk.wall_s, "cpu_ratio": ours.cpu_s / mk.cpu_s,
            "rss_ratio": ours.peak_rss_mb / mk.peak_rss_mb, "max_abs_diff": worst, "differing_fraction": differing,
            "random": method in RANDOM_METHODS, "our_timings": report["timings"],
            "runs": {k: [asdict(r) for r in v] for k, v in runs.items()}}


# Each tool's merge entry point, imported in a fresh process: what every merge pays before it starts.
STARTUP_IMPORTS = {"ours": "import pivotmerge.cli.commands, pivotmerge.run.merge",
                   "mergekit": "import mergekit.scripts.run_yaml", "torch alone": "import torch"}


def startup(repeats: int, work: Path) -> dict[str, Any]:
    """Per tool: a fresh process importing its merge entry point (median wall and CPU of `repeats`),
    the heaviest top-level packages by `-X importtime` self time, and `pivotmerge merge --help`."""
    out: dict[str, Any] = {}
    for tool, code in STARTUP_IMPORTS.items():
        runs = [run_measured([sys.executable, "-c", code], work / "startup.log") for _ in range(repeats)]
        trace = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True).stderr
        packages: dict[str, float] = {}
        for line in trace.splitlines()[1:]:
            own, _, name = line.removeprefix("import time:").split("|")
            top = name.strip().split(".")[0]
            packages[top] = packages.get(top, 0.0) + int(own) / 1e6
        heaviest = dict(sorted(packages.items(), key=lambda kv: -kv[1])[:6])
        out[tool] = {**asdict(median_run(runs)), "importtime_s": sum(packages.values()), "heaviest": heaviest}
    help_runs = [run_measured([console_script("pivotmerge"), "merge", "--help"], work / "startup.log") for _ in range(repeats)]
    out["merge --help"] = asdict(median_run(help_runs))
    return out


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


# Runs one merge in a fresh process and prints, as JSON, its own time (imports excluded; the
# previous output removed first, outside the timing) and what it read: the bytes of the tensors
# it took from its inputs (ModelRepo.get maps them) and of other file reads (/proc/self/io
# rchar: headers, configs).
_IN_PROCESS = """
import json, shutil, sys, time
from pivotmerge.repos.model_repo import ModelRepo
from pivotmerge.run.merge import merge
taken = []
get = ModelRepo.get
def counted(self, name):
    taken.append(self.tensors[name].nbytes)
    return get(self, name)
ModelRepo.get = counted
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
spec = json.loads(sys.argv[1])
shutil.rmtree(sys.argv[2], ignore_errors=True)
r0, t0 = rchar(), time.perf_counter()
report = merge(spec, sys.argv[2])
print(json.dumps({"merge_s": time.perf_counter() - t0, "tensor_bytes": sum(taken), "other_bytes": rchar() - r0,
                  "timings": report.timings.__dict__}))
"""


def projector_merge(shape: Shape, work: Path, repeats: int) -> dict[str, Any]:
    """A projector-only task-arithmetic merge of LLaVA-named models against copying the base,
    alternating."""
    repos = make_models(work / f"models-llava-{shape.layers}L", shape, llava=True)
    spec = our_spec("task_arithmetic", repos[0], repos[1:], {}) | {"components": ["projector"]}
    merges, copies = [], []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _IN_PROCESS, json.dumps(spec), str(work / "out-projector")],
                              capture_output=True, text=True, check=True)
        merges.append(json.loads(done.stdout.strip().splitlines()[-1]))
        target = work / "copy-base"
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        shutil.copytree(repos[0], target)
        copies.append(time.perf_counter() - t0)
    shutil.rmtree(work / "copy-base", ignore_errors=True)
    base_bytes = sum(2 * _numel(s) for s in {**{f"language_model.{n}": s for n, s in shape.tensors().items()},
                                               **projector_tensors(shape)}.values())
    projector_bytes = sum(2 * _numel(s) for s in projector_tensors(shape).values())
    merge_s = statistics.median(m["merge_s"] for m in merges)
    copy_s = statistics.median(copies)
    return {"merge_s": merge_s, "copy_base_s": copy_s, "extra_s": merge_s - copy_s,
            "tensor_bytes": statistics.median(m["tensor_bytes"] for m in merges),
            "other_bytes": statistics.median(m["other_bytes"] for m in merges), "base_bytes": base_bytes,
            "expected_tensor_bytes": base_bytes + EXPERTS * projector_bytes, "runs": merges, "copies": copies,
            "load": os.getloadavg()[0]}


# One merge in a fresh process, profiled: each thread's CPU time (from /proc/self/task, sampled
# every 20 ms, threads named by the engine: maths, reader, writer, hasher; the main thread hands
# tensors out) and the heaviest functions of the tensor merges (cProfile, own time). Prints JSON.
_PROFILED = """
import cProfile, json, os, pstats, sys, threading, time
from pathlib import Path
from pivotmerge.run.merge import merge
from pivotmerge.spec.schema import load_spec
tick = os.sysconf("SC_CLK_TCK")
names, cpu, done = {}, {}, threading.Event()
def sample():
    while not done.is_set():
        names.update({t.native_id: t.name.rsplit("_", 1)[0] for t in threading.enumerate()})
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        done.wait(0.02)
import pivotmerge.run.streaming as engine
profiles = []
merge_one = engine._merge_one
def profiled(*args):  # cProfile follows one thread: one profile per tensor, in the thread merging it
    profile = cProfile.Profile()
    profiles.append(profile)
    profile.enable()
    try:
        return merge_one(*args)
    finally:
        profile.disable()
engine._merge_one = profiled
spec = load_spec(Path(sys.argv[1]))
sampler = threading.Thread(target=sample, name="sampler")
sampler.start()
time.sleep(0.05)
before = dict(cpu)
wall = time.perf_counter()
report = merge(spec, sys.argv[2], overwrite=True)
wall = time.perf_counter() - wall
time.sleep(0.05)
done.set()
sampler.join()
threads = {}
for tid, seconds in cpu.items():
    name = names.get(tid, "other")
    if name != "sampler":
        threads[name] = threads.get(name, 0.0) + seconds - before.get(tid, 0.0)
stats = pstats.Stats(*profiles).stats
def label(file, line, function):  # built-ins as "to", "torch.einsum"; Python functions with their place
    return function.split("'")[1] if function.startswith("<method") else function.strip("<>").removeprefix("built-in method ") if file == "~" else f"{function} ({Path(file).name}:{line})"
top = sorted(((v[2], label(*k)) for k, v in stats.items()), reverse=True)[:8]
print(json.dumps({"wall_s": wall, "threads_cpu_s": threads, "timings": report.timings.__dict__,
                  "maths_top": [[name, own] for own, name in top], "load": os.getloadavg()[0]}))
"""


def profile_merges(methods: Sequence[str], work: Path) -> list[dict[str, Any]]:
    """Each of `methods` (their mergekit configs, written by the comparison) merged once, profiled."""
    rows = []
    for method in methods:
        done = subprocess.run([sys.executable, "-c", _PROFILED, str(work / f"{method}.mergekit.yml"), str(work / f"out-{method}-profiled")],
                              capture_output=True, text=True, check=True)
        rows.append({"method": method, **json.loads(done.stdout.strip().splitlines()[-1])})
        shutil.rmtree(work / f"out-{method}-profiled", ignore_errors=True)
    return rows


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

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "mergekit": _version("mergekit"), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# (title, column names, rows) for a table; (None, None, [[line]]) for a line of text.
Section = tuple[str | None, list[str] | None, list[list[str]]]


def _vs_mergekit_tables(result: dict[str, Any]) -> list[Section]:
    io = result["io_floor"]
    ties = next((r["ours"]["wall_s"] for r in result["vs_mergekit"] if r["method"] == "ties"), None)
    rows = []
    for r in result["vs_mergekit"]:
        mk, ours = r["mergekit"], r["ours"]
        diff = ["random", "random"] if r["random"] else [f"{r['max_abs_diff']:.3g}", f"{100 * r['differing_fraction']:.2f}%"]
        rows.append([r["method"], f"{mk['wall_s']:.1f} / {ours['wall_s']:.1f}", f"{r['wall_ratio']:.2f}",
                     f"{mk['cpu_s']:.1f} / {ours['cpu_s']:.1f}", f"{r['cpu_ratio']:.2f}", f"{ours['wall_s'] / io['floor_s']:.1f}", "-",
                     f"{mk['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f}", f"{r['rss_ratio']:.2f}", *diff,
                     f"{mk['load']:.1f} / {ours['load']:.1f}"])
    for r in result["ours_only"]:
        ours = r["ours"]
        rows.append([r["method"], f"- / {ours['wall_s']:.1f}", "-", f"- / {ours['cpu_s']:.1f}", "-",
                     f"{ours['wall_s'] / io['floor_s']:.1f}", f"{ours['wall_s'] / ties:.2f}" if ties else "-",
                     f"- / {ours['peak_rss_mb']:.0f}", "-", "-", "-", f"- / {ours['load']:.1f}"])
    columns = ["method", "wall s mk / ours", "wall ours/mk", "CPU s mk / ours", "CPU ours/mk", "ours / I-O floor",
               "ours / our TIES", "peak RSS MiB mk / ours", "RSS ours/mk", "max abs diff", "elements differing", "load mk / ours"]
    title = (f"Ours vs mergekit: {result['params'] / 1e6:.0f}M-parameter bf16 models, base + {EXPERTS} experts "
             f"(medians of {result['repeats']} alternating runs; CPU = user + system, all threads)")
    timing_rows = [[r["method"], f"{r['ours']['wall_s']:.1f}", f"{t['total_s']:.1f}", f"{t['total_s'] / io['floor_s']:.1f}",
                    f"{t['read_s']:.2f}", f"{t['merge_s']:.2f}", f"{t['write_s']:.2f}", f"{r['ours']['wall_s'] - t['total_s']:.1f}"]
                   for r in result["vs_mergekit"] for t in [r["our_timings"]]]
    return [(title, columns, rows),
            (None, None, [[f"I/O floor: reading the four inputs ({io['read_bytes'] / 2**30:.2f} GiB) {io['read_s']:.2f} s, "
                           f"writing one output ({io['write_bytes'] / 2**30:.2f} GiB) {io['write_s']:.2f} s: {io['floor_s']:.2f} s."]]),
            ("Where our wall time goes (last run's merge report): the merge itself, of it waiting for reads, for the "
             "maths (merges run on every core) and for the writer; the rest is start-up and exit",
             ["method", "wall s", "merge s", "merge / I-O floor", "waiting for reads s", "waiting for maths s",
              "waiting for writes s", "start-up + exit s"],
             timing_rows)]


def _startup_table(result: dict[str, Any]) -> list[Section]:
    rows = []
    for tool, r in result["startup"].items():
        heaviest = ", ".join(f"{name} {t:.2f}" for name, t in r.get("heaviest", {}).items())
        rows.append([tool, STARTUP_IMPORTS.get(tool, "pivotmerge merge --help"), f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                     f"{r['peak_rss_mb']:.0f}", heaviest or "-"])
    return [("Start-up: a fresh process importing each tool's merge entry point (medians); heaviest packages by "
             "-X importtime self time, s",
             ["tool", "what", "wall s", "CPU s", "peak RSS MiB", "heaviest imports"], rows)]


def _profile_table(result: dict[str, Any]) -> list[Section]:
    rows = []
    for r in result["profiles"]:
        threads = r["threads_cpu_s"]
        top = ", ".join(f"{name} {own:.2f}" for name, own in r.get("maths_top", r.get("main_top", []))[:5])
        rows.append([r["method"], f"{r['wall_s']:.1f}", f"{r['timings']['merge_s']:.1f}", f"{threads.get('pivotmerge-maths', 0):.2f}",
                     f"{threads.get('MainThread', 0):.2f}", f"{threads.get('pivotmerge-read', 0):.2f}",
                     f"{threads.get('pivotmerge-write', 0):.2f}", f"{threads.get('pivotmerge-hash', 0):.2f}", f"{r['load']:.1f}", top])
    return [("One merge in-process, imports excluded: wall, the time spent waiting for merged tensors, each thread's CPU "
             "(maths: the tensor merges, one per core; main: handing tensors out; reader: mapping and paging in; writer: "
             "writing; hasher: sha256), and the merges' heaviest functions (cProfile own time, s)",
             ["method", "wall s", "waiting for maths s", "maths CPU s", "main CPU s", "reader CPU s", "writer CPU s",
              "hasher CPU s", "load", "heaviest in the merges"], rows)]


def _svd_tables(result: dict[str, Any]) -> list[Section]:
    out: list[Section] = []
    if result["ours_only"]:
        rows = [[r["method"], str(len(c["per_tensor"])), str(c["randomized"]), str(c["exact"]), f"{c['ranks'][0]}-{c['ranks'][1]}",
                 f"{c['max_estimated_error']:.1e}"] for r in result["ours_only"] for c in [r["svd_choices"]]]
        out.append(("SVD choices per tensor, from each merge report (svd: auto)",
                    ["method", "tensors with SVDs", "randomized SVDs", "exact SVDs", "ranks", "max estimated error"], rows))
    if result["svd_errors"]:
        rows = [[f"{r['tensor']} ({r['shape'][0]} x {r['shape'][1]})", r["method"], r["device"], f"{r['exact_s']:.2f}",
                 f"{r['auto_s']:.2f}", ", ".join(f"{c['svd'][0]}{c['rank']}" for c in r["auto_choice"] or []),
                 f"{r['auto_rel_error']:.1e}"] for r in result["svd_errors"]]
        out.append(("svd: auto against svd: exact on the models' own tensors (one run each)",
                    ["tensor", "method", "device", "exact s", "auto s", "auto route (e/r + rank)", "real error vs exact"], rows))
    return out


def _projector_and_scale(result: dict[str, Any]) -> list[Section]:
    out: list[Section] = []
    p = result.get("projector")
    if p:
        out.append((None, None, [[
            f"Projector-only merge (LLaVA names, in-process, imports excluded, medians): {p['merge_s']:.2f} s; copying the "
            f"base folder: {p['copy_base_s']:.2f} s; extra {p['extra_s']:+.2f} s. Tensors taken from the inputs: "
            f"{p['tensor_bytes'] / 2**20:.1f} MiB (expected: the base's {p['base_bytes'] / 2**20:.1f} MiB + the experts' "
            f"projectors = {p['expected_tensor_bytes'] / 2**20:.1f} MiB); other reads (headers, configs) {p['other_bytes'] / 2**20:.2f} MiB; "
            f"load {p['load']:.1f}."]]))
    if result["rss_at_scale"]:
        rows = [[str(r["layers"]), f"{r['params'] / 1e6:.0f}M", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['load']:.1f}"]
                for r in result["rss_at_scale"]]
        out.append(("Our peak RSS as the model grows (task_arithmetic, same width, more layers; medians)",
                    ["layers", "parameters per model", "wall s", "peak RSS MiB", "load"], rows))
    return out


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 17's targets: (target, this run's figures, met)."""
    out = []
    io = result["io_floor"]
    vs = {r["method"]: r for r in result["vs_mergekit"]}
    for method in ("linear", "task_arithmetic"):
        r = vs.get(method)
        if r:
            floor = r["ours"]["wall_s"] / io["floor_s"]
            out += [(f"{method}: wall <= 0.25x mergekit", f"{r['wall_ratio']:.2f}x", r["wall_ratio"] <= 0.25),
                    (f"{method}: wall <= 3x the I/O floor", f"{floor:.1f}x", floor <= 3),
                    (f"{method}: peak RSS <= 0.25x mergekit", f"{r['rss_ratio']:.2f}x", r["rss_ratio"] <= 0.25),
                    (f"{method}: bit-identical to mergekit in bf16", f"max abs diff {r['max_abs_diff']:.3g}", r["max_abs_diff"] == 0)]
    for method in ("ties", "dare_ties"):
        r = vs.get(method)
        if r:
            out += [(f"{method}: wall <= 0.1x mergekit", f"{r['wall_ratio']:.2f}x", r["wall_ratio"] <= 0.1),
                    (f"{method}: peak RSS <= 0.3x mergekit", f"{r['rss_ratio']:.2f}x", r["rss_ratio"] <= 0.3)]
    if len(result["rss_at_scale"]) == 2:
        small, big = result["rss_at_scale"]
        growth = big["peak_rss_mb"] / small["peak_rss_mb"] - 1
        out.append((f"peak RSS at {big['params'] / 1e6:.0f}M within 10% of {small['params'] / 1e6:.0f}M (task_arithmetic)",
                    f"{big['peak_rss_mb']:.0f} vs {small['peak_rss_mb']:.0f} MiB ({100 * growth:+.1f}%)", growth <= 0.10))
    ties = vs.get("ties")
    for r in result["ours_only"]:
        if ties:
            ratio = r["ours"]["wall_s"] / ties["ours"]["wall_s"]
            out.append((f"{r['method']} on whole models: wall <= 3x our TIES", f"{ratio:.2f}x", ratio <= 3))
    if result["svd_errors"]:
        worst = max(r["auto_rel_error"] for r in result["svd_errors"])
        out.append(("randomized SVD: real error < 1% of the merged update", f"at most {worst:.1e}", worst < 0.01))
    p = result.get("projector")
    if p:
        out += [("projector-only merge reads only the experts' projectors",
                 f"{p['tensor_bytes'] / 2**20:.1f} of {p['expected_tensor_bytes'] / 2**20:.1f} MiB expected",
                 p["tensor_bytes"] == p["expected_tensor_bytes"]),
                ("projector-only merge: well under 1 s more than copying the base (< 0.5 s)", f"{p['extra_s']:+.2f} s", p["extra_s"] < 0.5)]
    return out


def sections(result: dict[str, Any]) -> list[Section]:
    """Every table of a run, for the console and for markdown alike."""
    m = result["machine"]
    after = m.get("load_avg_after", m["load_avg"])
    described = (f"Machine: {m['cpus']} CPUs ({m.get('cpu', '?')}), {m['memory_gib']} GiB, GPU {m['cuda'] or 'none'}; "
                 f"{m['platform']}, Python {m['python']}, torch {m['torch']}, mergekit {m.get('mergekit')}; load average "
                 f"{m['load_avg'][0]:.1f} at the start, {after[0]:.1f} at the end (each run's own is in the tables). "
                 f"Command: `{result.get('command', '')}`")
    out: list[Section] = [(None, None, [[described]])]
    out += _vs_mergekit_tables(result)
    if result.get("startup"):
        out += _startup_table(result)
    if result.get("profiles"):
        out += _profile_table(result)
    out += _svd_tables(result) + _projector_and_scale(result)
    out.append(("Targets (issue 17)", ["target", "this run", "met"],
                [[t, figure, "met" if ok else "missed"] for t, figure, ok in targets(result)]))
    return out


def print_results(result: dict[str, Any]) -> None:
    for title, columns, rows in sections(result):
        if columns is None:
            console.print(rows[0][0])
            continue
        table = Table(title=title)
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(result: dict[str, Any]) -> str:
    """The results as the markdown of docs/performance.md."""
    lines: list[str] = []
    for title, columns, rows in sections(result):
        if columns is None:
            lines += [rows[0][0], ""]
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
        lines += ["| " + " | ".join(cell.replace("<", "&lt;") for cell in row) + " |" for row in rows]  # `<genexpr>` is not a tag
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("200M"), help="Parameters per model (default 200M).")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, help="Decoder layers (default: what reaches --params).")
    parser.add_argument("--methods", nargs="+", default=["ties", "dare_ties", *OUR_ONLY_METHODS, "linear", "task_arithmetic"],
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
    import pivotmerge

    compileall.compile_dir(Path(pivotmerge.__file__).parent, quiet=1)  # as `pip install` does; mergekit's is compiled
    result: dict[str, Any] = {"machine": machine(), "shape": asdict(shape), "params": shape.params, "repeats": args.repeats,
                              "command": " ".join(["python", *sys.argv]), "vs_mergekit": [], "ours_only": []}
    repos = make_models(args.work / f"models-{shape.layers}L", shape)

    def checkpoint() -> None:
        """Save what has been measured so far: a run cut short keeps its finished stages."""
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    result["svd_errors"], result["projector"], result["rss_at_scale"], result["profiles"] = [], None, [], []
    result["io_floor"] = io_floor(repos, args.work, args.repeats)
    result["startup"] = startup(args.repeats, args.work)
    checkpoint()
    # TIES first: the SVD methods' target is relative to it.
    for method in sorted(args.methods, key=lambda m: m != "ties"):
        if method in MERGEKIT_METHODS:
            result["vs_mergekit"].append(compare_with_mergekit(method, repos, args.work, args.repeats))
        else:
            result["ours_only"].append(time_ours(method, repos, args.work, args.repeats))
        checkpoint()
    result["profiles"] = profile_merges([m for m in MERGEKIT_METHODS if m in args.methods], args.work)
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
