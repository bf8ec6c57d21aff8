"""The CUDA path of every merge method on a 7B-shaped layer subset, generated on the GPU.

    bash benchmarks/gpu.sh [--out benchmarks/results/gpu.json]

Builds, on the GPU, a base and three experts of the tensors of a Llama-2-7B-shaped
model's embedding and first decoder layer (hidden 4096, MLP 11008, vocab 32000),
with fine-tuning-like updates (`perf.fine_tune_like`: low rank plus 5% noise), stored
in bf16 as checkpoints are. Then prints one table:

* every registered method on every tensor on CUDA (float32 maths from bf16, as the
  engine does): total seconds;
* agreement with the CPU on the same tensors (the layer's attention and MLP
  weights and a norm; the embedding is left to the GPU for time): the largest
  relative difference of the float32 results, ||cuda - cpu|| / ||cpu - W0||, and the
  share of bf16 output elements that differ;
* exact against randomized SVD timings on CUDA for each matrix shape.

RegMean (and PivotMerge's gram combine) get random input Gram matrices of the layer's
inputs. Randomized SVDs draw from each device's own generator, so CPU and CUDA
differ there by the randomized SVD's error (under 1% of the update by its contract).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from perf import EXPERTS, fine_tune_like  # noqa: E402  (run from benchmarks/)
from pivotmerge.methods import Calibration, Method, all_methods
from pivotmerge.methods.toolkit.svd import exact_svd, low_rank_svd

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
TENSORS: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (VOCAB, HIDDEN),
    "model.layers.0.input_layernorm.weight": (HIDDEN,),
    "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.v_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.gate_proj.weight": (MLP, HIDDEN),
    "model.layers.0.mlp.up_proj.weight": (MLP, HIDDEN),
    "model.layers.0.mlp.down_proj.weight": (HIDDEN, MLP),
}
CPU_CHECKED = ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.mlp.down_proj.weight")
# Parameters that make a method run at all on data-free tensors (slerp takes two models).
SETTINGS: dict[str, dict[str, Any]] = {"tsv": {"energy": 0.9}, "dare_ties": {"density": 0.5},
                                       "dare_linear": {"density": 0.5},
                                       "ties": {"density": 0.5}, "slerp": {"t": 0.5}}


def make_tensors(device: str, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """name -> [base, *experts] in bf16 on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in TENSORS.items():
        if len(shape) == 1:
            base = torch.ones(shape, device=device)
        else:
            base = torch.randn(shape, generator=g, device=device).mul_(0.02)
        experts = [base + (torch.randn(shape, generator=g, device=device).mul_(0.002) if len(shape) == 1
                           else fine_tune_like(shape, 0.002, g, device)) for _ in range(EXPERTS)]
        out[name] = [t.to(torch.bfloat16) for t in (base, *experts)]
    return out


def grams(n: int, device: str, seed: int) -> list[torch.Tensor]:
    """Gram matrices X^T X of 2n random inputs per expert."""
    g = torch.Generator(device=device).manual_seed(seed)
    xs = [torch.randn(2 * n, n, generator=g, device=device) for _ in range(EXPERTS)]
    return [x.T @ x / x.shape[0] for x in xs]


def run(method: Method, stored: Sequence[torch.Tensor], device: str, name: str) -> torch.Tensor:
    base, *experts = [t.to(device=device, dtype=torch.float32) for t in stored]
    experts = experts[:2] if method.max_models == 2 else experts
    params = method.params.model_validate(SETTINGS.get(method.name, {}))
    calibration = Calibration()
    if method.data and base.dim() == 2 and "embed" not in name:
        calibration = Calibration(grams=[g.to(device) for g in grams(base.shape[1], "cpu", 1)])
    out = method(experts, None if method.base == "unused" else base, [1.0 / len(experts)] * len(experts), params,
                 torch.Generator(device=device).manual_seed(0), calibration).tensor
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def method_rows(tensors: dict[str, list[torch.Tensor]]) -> list[dict[str, Any]]:
    rows = []
    for method in all_methods().values():
        run(method, tensors["model.layers.0.self_attn.q_proj.weight"], "cuda", "warm-up")
        cuda_s, rel, bf16_differ = 0.0, 0.0, []
        for name, stored in tensors.items():
            seconds, out = timed(lambda: run(method, stored, "cuda", name))
            cuda_s += seconds
            if name in CPU_CHECKED:
                cpu = run(method, [t.cpu() for t in stored], "cpu", name)
                update = float((cpu - stored[0].cpu().float()).norm())
                rel = max(rel, float((out.cpu() - cpu).norm()) / max(update, 1e-30))
                bf16_differ.append(float((out.cpu().to(torch.bfloat16) != cpu.to(torch.bfloat16)).float().mean()))
            del out
        rows.append({"method": method.name, "cuda_s": cuda_s, "max_rel_diff_vs_cpu_f32": rel,
                     "bf16_elements_differing_vs_cpu": max(bf16_differ)})
        print(f"{method.name}: {cuda_s:.2f} s on CUDA, vs CPU {rel:.2e} (float32), "
              f"{max(bf16_differ):.2e} of bf16 elements differ", flush=True)
    return rows


def svd_rows(tensors: dict[str, list[torch.Tensor]]) -> list[dict[str, Any]]:
    rows, seen = [], set()
    for base, expert, *_ in tensors.values():
        shape = tuple(base.shape)
        if len(shape) != 2 or shape in seen:
            continue
        seen.add(shape)
        delta = expert.float() - base.float()
        lapack_s, _ = timed(lambda: torch.linalg.svd(delta, full_matrices=False))
        gram_s, (u, s, vh) = timed(lambda: exact_svd(delta))
        seeded = torch.Generator(device="cuda").manual_seed(0)
        auto_s, (ua, sa, vha, choice) = timed(lambda: low_rank_svd(delta, None, 0.9, "auto", seeded))
        exact = (u[:, :choice.rank] * s[:choice.rank]) @ vh[:choice.rank]
        error = float(((ua * sa) @ vha - exact).norm() / exact.norm())
        rows.append({"shape": list(shape), "torch_svd_s": lapack_s, "exact_gram_s": gram_s, "auto_s": auto_s,
                     "auto_route": choice.svd, "rank": choice.rank, "auto_rel_error": error})
        print(f"SVD {shape}: torch.linalg.svd {lapack_s:.2f} s, exact (Gram) {gram_s:.2f} s, auto {auto_s:.3f} s "
              f"({choice.svd}, rank {choice.rank}, error {error:.1e})", flush=True)
    return rows


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['machine']}")
    print("| method | CUDA s (9 tensors) | max rel. diff vs CPU, float32 | bf16 elements differing vs CPU |")
    print("|---|---:|---:|---:|")
    for r in result["methods"]:
        print(f"| {r['method']} | {r['cuda_s']:.2f} | {r['max_rel_diff_vs_cpu_f32']:.1e} "
              f"| {r['bf16_elements_differing_vs_cpu']:.1e} |")
    print("\n| matrix | torch.linalg.svd s | exact (Gram) s | auto s | auto route, rank | auto rel. error |")
    print("|---|---:|---:|---:|---|---:|")
    for r in result["svd"]:
        print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['torch_svd_s']:.2f} | {r['exact_gram_s']:.2f} "
              f"| {r['auto_s']:.3f} | {r['auto_route']}, {r['rank']} | {r['auto_rel_error']:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"{platform.platform()}, {torch.get_num_threads()} CPU threads")
    started = time.perf_counter()
    tensors = make_tensors("cuda")
    result = {"machine": machine, "svd": svd_rows(tensors), "methods": method_rows(tensors),
              "total_s": time.perf_counter() - started}
    print_table(result)
    print(f"\ntotal {result['total_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
