"""Weight-distance metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pivotmerge.analysis.metrics import (TensorMetrics, aggregate, cosine_similarity, l2_distance, pair_metrics, pairwise,
                                relative_l2_distance, sign_dissimilarity, soft_sign_dissimilarity,
                                truncated_sign_dissimilarity)

T = torch.tensor


def test_l2_and_relative_l2():
    x, y = T([3.0, 0.0]), T([0.0, 4.0])
    assert l2_distance(x, y) == pytest.approx(5.0)
    assert relative_l2_distance(x, y) == pytest.approx(5.0 / 3.5)
    assert relative_l2_distance(torch.zeros(2), torch.zeros(2)) == 0.0


def test_cosine():
    assert cosine_similarity(T([1.0, 1.0]), T([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity(T([1.0, 2.0]), T([-2.0, -4.0])) == pytest.approx(-1.0)
    assert cosine_similarity(T([1.0, 2.0]), torch.zeros(2)) == 0.0


def test_sign_dissimilarity_counts_entries_where_either_is_nonzero():
    # entries: same, opposite, zero vs positive, both zero (ignored) -> 2 of 3 differ
    x, y = T([1.0, 2.0, 0.0, 0.0]), T([5.0, -1.0, 3.0, 0.0])
    assert sign_dissimilarity(x, y) == pytest.approx(2 / 3)


def test_soft_sign_dissimilarity_weighs_by_magnitude():
    # 1 - |x+y|/(|x|+|y|): same sign 0, [2 vs -2] 1, [3 vs -1] 1 - 2/4 = .5, [0 vs 3] 0
    x, y = T([1.0, 2.0, 3.0, 0.0, 0.0]), T([4.0, -2.0, -1.0, 3.0, 0.0])
    assert soft_sign_dissimilarity(x, y) == pytest.approx((0 + 1 + 0.5 + 0) / 4)


def test_truncated_sign_dissimilarity_ignores_small_entries():
    # keep the top half of each: x -> [10, 0, 0, -5], y -> [8, 0, 0, 6]; small flips don't count
    x, y = T([10.0, 0.1, -0.2, -5.0]), T([8.0, -0.1, 0.3, 6.0])
    assert truncated_sign_dissimilarity(x, y, keep=0.5) == pytest.approx((0 + (1 - 1 / 11)) / 2)
    assert truncated_sign_dissimilarity(x, y, keep=1.0) == pytest.approx(soft_sign_dissimilarity(x, y))
    assert torch.equal(x, T([10.0, 0.1, -0.2, -5.0]))  # inputs untouched


def test_pair_metrics_use_task_vectors_when_a_base_is_given():
    base = T([10.0, 10.0])
    a, b = base + T([1.0, 0.0]), base + T([0.0, 1.0])
    with_base = pair_metrics(a, b, base)
    assert with_base["cosine"] == pytest.approx(0.0)
    assert pair_metrics(a, b)["cosine"] == pytest.approx(float((a @ b) / (a.norm() * b.norm())))
    assert with_base["l2"] == pytest.approx(math.sqrt(2))


def test_pairwise_averages_over_all_pairs():
    x, y, z = T([1.0]), T([-1.0]), T([2.0])
    # pairs (x,y) (x,z) (y,z): sign dissimilarity 1, 0, 1; l2 2, 1, 3
    out = pairwise([x, y, z])
    assert out["sign_dissimilarity"] == pytest.approx(2 / 3)
    assert out["l2"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two models"):
        pairwise([x])


def test_aggregate_is_numel_weighted_per_layer_and_total():
    records = [
        TensorMetrics("l0.w", "layer.0", 30, {"cosine": 1.0}),
        TensorMetrics("l0.b", "layer.0", 10, {"cosine": 0.0}),
        TensorMetrics("l1.w", "layer.1", 60, {"cosine": 0.5}),
    ]
    out = aggregate(records)
    assert out["layers"] == {"layer.0": {"cosine": pytest.approx(0.75)}, "layer.1": {"cosine": pytest.approx(0.5)}}
    assert out["total"]["cosine"] == pytest.approx((30 + 0 + 30) / 100)
    assert aggregate([]) == {"layers": {}, "total": {}}
