"""The CUDA path of the methods and the SVD helpers: the same results as on the CPU.

Runs only where CUDA is present (benchmarks/gpu.sh runs it there); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from pivotmerge.methods import Calibration, all_methods
from pivotmerge.methods.toolkit.svd import SVD_TOLERANCE, exact_svd, low_rank_svd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = {"ties": {"density": 0.5}, "dare_ties": {"density": 1.0}, "dare_linear": {"density": 1.0}, "tsv": {"energy": 0.9}}


def experts(shape, k=3, seed=0):
    """A base and `k` experts whose updates are low rank plus a little noise (vectors: noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)

    def update():
        noise = 0.005 * torch.randn(shape, generator=g)
        if len(shape) == 1:
            return noise
        return noise + 0.1 * torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)
    return base, [base + update() for _ in range(k)]


@pytest.mark.parametrize("name", sorted(all_methods()))
@pytest.mark.parametrize("shape", [(64, 48), (48,), (600, 700)])
def test_every_method_gives_the_cpu_result_on_cuda(name, shape):
    method = all_methods()[name]
    base, models = experts(shape)
    models = models[:2] if method.max_models == 2 else models
    params = method.params.model_validate(SETTINGS.get(name, {}))
    calibration = Calibration()
    if method.data and len(shape) == 2:
        x = torch.randn(2 * shape[1], shape[1], generator=torch.Generator().manual_seed(1))
        calibration = Calibration(grams=[x.T @ x] * len(models))

    def run(device):
        out = method([m.to(device) for m in models], None if method.base == "unused" else base.to(device),
                     [1.0] * len(models), params, torch.Generator(device=device).manual_seed(0),
                     Calibration(**{k: None if v is None else [g.to(device) for g in v]
                                    for k, v in (("grams", calibration.grams), ("cross_grams", calibration.cross_grams))},
                                 alignment=calibration.alignment))
        return out.tensor.cpu()

    cpu, cuda = run("cpu"), run("cuda")
    update = (cpu - base).norm()
    # Randomized SVDs draw from each device's generator: they agree within their tolerance.
    assert (cuda - cpu).norm() <= max(SVD_TOLERANCE * update, 1e-4 * cpu.norm())


def test_svd_helpers_on_cuda():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(2000, 8, generator=g) @ torch.randn(8, 700, generator=g)) + 0.01 * torch.randn(2000, 700, generator=g)
    u, s, vh = exact_svd(a.cuda())
    assert torch.allclose(s.cpu(), torch.linalg.svdvals(a.double()).float(), rtol=1e-4, atol=1e-5)
    assert (((u * s) @ vh).cpu() - a).norm() / a.norm() < 1e-5
    ua, sa, vha, choice = low_rank_svd(a.cuda(), None, 0.9, "auto", torch.Generator(device="cuda").manual_seed(0))
    assert choice.svd == "randomized"
    exact = (u[:, :choice.rank] * s[:choice.rank]) @ vh[:choice.rank]
    assert ((ua * sa) @ vha - exact).norm() / exact.norm() < SVD_TOLERANCE
