"""Evaluation metrics on a model whose predictions are known by construction.

The tiny example LLaVA is rewired into a bigram model: attention and MLP outputs
are zeroed, so each position's final hidden state is its own token embedding.
Every token embeds to direction 0 except "red" (direction 1), and the head maps
direction 0 to logit Z0 on "red" and direction 1 to logit Z1 on the end of
sequence. So after "red" the model favours "</s>", and everywhere else "red":
probabilities, losses and greedy answers follow by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.evaluate import (
    evaluate_models, load_model, normalize_answer, target_mask, token_stats,
)
from pivotmerge.data.example import make_example

Z0, Z1 = 3.0, 2.0


def _bigram_repo(root: Path, z0: float = Z0) -> Path:
    ex = make_example(root, n_experts=1, seed=0)
    state = load_file(ex.base / "model.safetensors")
    tok = load_model(ex.base, "cpu").processor.tokenizer
    red, eos = tok.convert_tokens_to_ids("red"), tok.eos_token_id
    emb = state["model.language_model.embed_tokens.weight"]
    vocab, d = emb.shape
    # Each embedding has mean square 1, so RMSNorm (weight 1) leaves it unchanged.
    emb = torch.zeros(vocab, d)
    emb[:, 0] = math.sqrt(d)
    emb[red] = 0
    emb[red, 1] = math.sqrt(d)
    head = torch.zeros(vocab, d)
    head[red, 0] = z0 / math.sqrt(d)
    head[eos, 1] = Z1 / math.sqrt(d)
    state["model.language_model.embed_tokens.weight"] = emb
    state["lm_head.weight"] = head
    state["model.language_model.norm.weight"] = torch.ones(d)
    for name in state:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[name] = torch.zeros_like(state[name])
    save_file(state, str(ex.base / "model.safetensors"), metadata={"format": "pt"})
    return ex.base, vocab


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigram")
    base, vocab = _bigram_repo(root / "ex")
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(data / "img.png")
    records = [
        {"image": "img.png", "caption": "a red circle on the left", "question": "what colour is the shape ?", "answer": "red"},
        {"image": "img.png", "caption": "blue dots red", "question": "what colour is the shape ?", "answer": "blue"},
    ]
    (data / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    # The chat format: the first caption token follows a text token, so the bigram predicts it by hand.
    return base, vocab, load_dataset(data / "data.jsonl", prompt="chat")


def test_metrics_match_the_hand_computation(bigram):
    base, vocab, dataset = bigram
    # After any token but "red": p(red) = e^Z0 / (e^Z0 + V - 1), any other token 1 / (e^Z0 + V - 1).
    n0 = math.exp(Z0) + vocab - 1
    n1 = math.exp(Z1) + vocab - 1
    p0_red, p0_other = math.exp(Z0) / n0, 1 / n0
    p1_eos, p1_other = math.exp(Z1) / n1, 1 / n1
    # Caption 1 targets: a red circle on the left </s>; "circle" follows "red".
    nll1 = -(5 * math.log(p0_other) + math.log(p0_red) + math.log(p1_other))
    # Caption 2 targets: blue dots red </s>; "</s>" follows "red".
    nll2 = -(2 * math.log(p0_other) + math.log(p0_red) + math.log(p1_eos))
    loss = (nll1 + nll2) / 11
    for batch_size in (1, 2):  # padding must not change anything
        (m,) = evaluate_models({"bigram": base}, [dataset], device="cpu", batch_size=batch_size)["bigram"]
        assert m.tokens == 11 and m.samples == 2 and m.questions == 2
        assert m.caption_loss == pytest.approx(loss, rel=1e-5)
        assert m.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
        # Hits: "red" in caption 1; "red" and "</s>" in caption 2.
        assert m.token_accuracy == pytest.approx(3 / 11)
        # Greedy answer is "red" then end of sequence: right for the first question only.
        assert m.exact_match == pytest.approx(0.5)


def test_a_loss_past_exp_range_gives_an_infinite_perplexity(bigram, tmp_path):
    """exp(loss) overflows a float above about 709: a wildly wrong merge must still be scored, not crash."""
    _, _, dataset = bigram
    base, _ = _bigram_repo(tmp_path / "ex", z0=4000.0)  # every token after a non-"red" one costs about 4000 nats
    (m,) = evaluate_models({"sure": base}, [dataset], device="cpu")["sure"]
    assert m.caption_loss > 2000 and m.perplexity == math.inf


def test_token_stats_on_hand_made_logits():
    # Row 0 predicts tokens 1 and 2 (targets), row 1 is padding except one target.
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]],
                                     [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.7, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2], [0, 0, 1]])
    targets = torch.tensor([[False, True, True], [False, False, True]])
    stats = token_stats(logits, ids, targets)
    assert stats.tokens == 3 and stats.correct == 2  # 0.8 on token 2 and 0.7 on token 1 are argmaxes
    assert stats.nll == pytest.approx(-(math.log(0.25) + math.log(0.8) + math.log(0.7)))


def test_target_mask_marks_the_last_tokens_whichever_side_pads():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    n = torch.tensor([2, 3])
    assert target_mask(left, n).int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert target_mask(right, n).int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]


def test_answers_are_compared_without_case_spacing_or_end_punctuation():
    assert normalize_answer("  Red  Circle. ") == "red circle"
    assert normalize_answer("red") != normalize_answer("reds")
