"""Data-driven alignment scores: a layer whose update does not help on the data is dropped."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from pivotmerge.data.calibration import alignment_scores, layer_groups
from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.evaluate import caption_batches, load_model
from pivotmerge.data.example import make_example
from pivotmerge.methods.pivotmerge import Params, layer_weights

L1, L2 = "model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2."


def _train_projector(model_dir, dataset, steps: int = 25) -> dict[str, torch.Tensor]:
    """The base's projector after a few steps of caption training: an update that helps."""
    torch.manual_seed(0)
    loaded = load_model(model_dir, "cpu")
    model = loaded.model.train()
    params = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    (batch,) = caption_batches(loaded.processor, dataset.records, batch_size=len(dataset.records))
    labels = batch.inputs["input_ids"].masked_fill(~batch.targets, -100)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch.inputs, labels=labels).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "multi_modal_projector" in n}


def test_useless_layer_update_gets_no_weight(tmp_path):
    ex = make_example(tmp_path / "ex", n_experts=2, seed=1, with_data=True, n_samples=8)
    data = load_dataset(ex.datasets["shapes"])
    trained = _train_projector(ex.base, data)
    base = load_file(ex.base / "model.safetensors")
    # Expert 1: the trained projector. Expert 2: the same first layer, but noise for the second.
    noise = torch.Generator().manual_seed(5)
    for path, noisy in ((ex.experts[0], False), (ex.experts[1], True)):
        state = {**base, **trained}
        if noisy:
            for n in (L2 + "weight", L2 + "bias"):
                state[n] = base[n] + 3 * base[L2 + "weight"].std() * torch.randn(base[n].shape, generator=noise)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    names = [n for n in base if "multi_modal_projector" in n]
    result = alignment_scores(ex.base, ex.experts, data, names, device="cpu", batch_size=8)

    assert result.groups == layer_groups(names) == {"projector.1": [L1 + "bias", L1 + "weight"],
                                                     "projector.2": [L2 + "bias", L2 + "weight"]}
    # Removing an update puts the base's tensors back: the whole projector back is the base's loss.
    base_loss = alignment_scores(ex.base, [ex.base], data, names, device="cpu").baseline[0]
    assert result.baseline[0] < base_loss  # training helped
    contrib = result.contributions
    assert contrib["projector.2"][0] > 0  # the trained second layer matters to expert 1
    assert contrib["projector.2"][1] == 0.0  # expert 2's noisy second layer does not
    scores = result.scores
    assert max(max(s) for s in scores.values()) == 1.0 and all(0 <= x <= 1 for s in scores.values() for x in s)
    assert result.for_tensor(L2 + "weight") == scores["projector.2"]
    # PivotMerge's data mode then gives expert 2 no weight in that layer (the shares are unused there).
    weights, _ = layer_weights(Params(layer_weighting="data"), [1.0, 1.0], torch.tensor([0.5, 0.5]), scores["projector.2"])
    assert weights == [2.0, 0.0]
