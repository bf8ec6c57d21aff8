"""Expert folding of one model's modality-specific FFNs into one shared FFN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pivotmerge.data.calibration import GramCollector
from pivotmerge.errors import CompatibilityError, SpecError
from pivotmerge.fold.folding import FoldSpec, fold_state

MAPS = {"vision": {"pattern": r"\.mlp\.vision\.", "replace": ".mlp."},
        "text": {"pattern": r"\.mlp\.text\.", "replace": ".mlp."}}


class FFN(nn.Module):
    def __init__(self, d: int = 4, h: int = 6):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class MoMEBlock(nn.Module):
    """A block with one FFN per modality (VLMo-style): tokens go to their modality's FFN."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict({"vision": FFN(), "text": FFN()})

    def forward(self, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        return x + torch.where(is_image[..., None], self.mlp["vision"](x), self.mlp["text"](x))


class SharedBlock(nn.Module):
    """The folded, modality-agnostic block."""

    def __init__(self):
        super().__init__()
        self.mlp = FFN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, block: type[nn.Module], n: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([block() for _ in range(n)])


def _integer_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Small integers, so the formulas hold exactly in floating point."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(-4, 5, t.shape, generator=g).float() for n, t in model.state_dict().items()}


def test_folded_names_load_into_the_shared_model_and_interpolate():
    state = _integer_state(Model(MoMEBlock), 0)
    spec = FoldSpec(method="interpolation", groups=MAPS, weights={"vision": 3.0})
    folded, report = fold_state(state, spec)
    shared = Model(SharedBlock)
    shared.load_state_dict(folded, strict=True)  # exactly the shared model's names, nothing left over
    for name in folded:
        v, t = state[name.replace(".mlp.", ".mlp.vision.")], state[name.replace(".mlp.", ".mlp.text.")]
        assert torch.equal(folded[name], (3 * v + t) / 4)
    assert report["folded"]["layers.1.mlp.up.weight"] == {"vision": "layers.1.mlp.vision.up.weight",
                                                          "text": "layers.1.mlp.text.up.weight"}


def test_modality_arithmetic_is_w0_plus_lambda_times_the_summed_deltas():
    state = _integer_state(Model(MoMEBlock), 1)
    w0 = _integer_state(Model(SharedBlock), 2)  # the pre-trained FFN both experts started from
    spec = FoldSpec.model_validate({"method": "modality_arithmetic", "groups": MAPS, "lambda": 0.5})
    folded, _ = fold_state(state, spec, w0=w0)
    for name, base in w0.items():
        v, t = state[name.replace(".mlp.", ".mlp.vision.")], state[name.replace(".mlp.", ".mlp.text.")]
        assert torch.equal(folded[name], base + 0.5 * ((v - base) + (t - base)))
    # The model's own untouched shared weights serve as W0 when it kept them.
    folded_own, _ = fold_state({**state, **w0}, spec)
    assert all(torch.equal(folded_own[n], folded[n]) for n in w0)
    with pytest.raises(CompatibilityError, match="W0"):
        fold_state(state, spec)


def test_regmean_folding_fits_each_modality_on_its_own_tokens():
    torch.manual_seed(0)
    model = Model(MoMEBlock, n=1)
    x = torch.randn(3, 8, 4)
    is_image = torch.arange(8).expand(3, 8) < 5
    block = model.layers[0]
    modules = {f"layers.0.mlp.{m}.{p}.weight": getattr(block.mlp[m], p)
               for m in ("vision", "text") for p in ("up", "down")}
    with GramCollector(modules) as collector:
        # Each FFN sees only its modality's tokens, as in a routed forward pass.
        for m, mask in (("vision", is_image), ("text", ~is_image)):
            collector.token_mask = mask
            block.mlp[m](x)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    spec = FoldSpec(method="regmean", groups=MAPS, alpha=1.0)
    folded, _ = fold_state(state, spec, grams=collector.grams)
    # alpha 1: the up projection that best reproduces each FFN's up projection on its own tokens.
    xv, xt = x[is_image].double(), x[~is_image].double()
    wv, wt = state["layers.0.mlp.vision.up.weight"].double(), state["layers.0.mlp.text.up.weight"].double()
    expected = torch.linalg.lstsq(torch.cat([xv, xt]), torch.cat([xv @ wv.T, xt @ wt.T])).solution.T
    assert torch.allclose(folded["layers.0.mlp.up.weight"].double(), expected, atol=1e-5)
    # Biases have no Gram matrix: they interpolate.
    bv, bt = state["layers.0.mlp.vision.up.bias"], state["layers.0.mlp.text.up.bias"]
    assert torch.allclose(folded["layers.0.mlp.up.bias"], (bv + bt) / 2)


def test_name_maps_must_pair_up():
    state = {"a.mlp.vision.w": torch.zeros(2), "a.mlp.text.w": torch.zeros(2), "b.mlp.vision.w": torch.zeros(2),
             "other": torch.ones(1)}
    with pytest.raises(CompatibilityError, match="b.mlp.vision.w folds into b.mlp.w, but modality 'text'"):
        fold_state(state, FoldSpec(method="interpolation", groups=MAPS))
    with pytest.raises(SpecError, match="no tensor name matches"):
        fold_state({"other": torch.ones(1)}, FoldSpec(method="interpolation", groups=MAPS))
    with pytest.raises(ValueError, match="not a modality"):
        FoldSpec(method="interpolation", groups=MAPS, weights={"audio": 1.0})
