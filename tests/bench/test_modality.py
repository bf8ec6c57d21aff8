"""The modality study's quick mode, end to end through the CLI: tables, plot, and the finding it can show."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pivotmerge.bench.modality import METHODS, METRICS, QUICK, SEED_SUFFIX, TASKS, run
from pivotmerge.cli.main import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("modality") / "out"
    main(["bench", "modality", "--quick", "--out", str(out)])
    return out


def test_quick_mode_writes_the_tables_and_the_plot(quick_run):
    result = json.loads((quick_run / "results.json").read_text())
    assert [p["seed_steps"] for p in result["points"]] == list(QUICK.seed_steps)
    for point in result["points"]:
        assert set(point["folded"]) == set(METHODS)
        for scores in (*point["folded"].values(), point["scratch"]):
            assert set(scores) == {*TASKS, "average"} and all(0 <= s <= 100 for s in scores.values())
            assert scores["average"] == pytest.approx(sum(scores[t] for t in TASKS) / len(TASKS))
        for key in ("distances", "distances_to_seed"):
            assert set(point[key]["total"]) == set(METRICS)
            assert {"layer.0", "layer.3"} <= set(point[key]["layers"])
    assert set(result["spearman"]) == set(METRICS) | {m + SEED_SUFFIX for m in METRICS}
    assert all(set(row) == {*METHODS, "mean"} for row in result["spearman"].values())
    table = (quick_run / "results.md").read_text()
    assert "| seed steps | model | retrieval | vqa | nlvr | average |" in table and "Best predictor:" in table
    assert (quick_run / "modality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every fold went through pivotmerge.fold on real folders: a report per method and point.
    for point in result["points"]:
        for method in METHODS:
            folder = quick_run / "models" / f"seed-{point['seed_steps']}" / method
            report = json.loads((folder / "fold_report.json").read_text())
            assert report["method"] == method


def test_longer_seed_pretraining_brings_the_experts_closer(quick_run):
    """The paper's mechanism: experts copied from a longer-trained seed move less apart in the same
    modality-specific pre-training (every distance falls, cosine rises, along the sweep)."""
    totals = [p["distances"]["total"] for p in json.loads((quick_run / "results.json").read_text())["points"]]
    for metric in ("l2", "relative_l2", "sign_dissimilarity", "soft_sign_dissimilarity"):
        values = [t[metric] for t in totals]
        assert values == sorted(values, reverse=True) and values[0] > values[-1], (metric, values)
    cosines = [t["cosine"] for t in totals]
    assert cosines == sorted(cosines) and cosines[-1] > cosines[0]


def test_scores_average_over_the_suites_fine_tunes():
    """`finetune_seeds` fine-tunes per score: their mean, repeat 0 being the single fine-tune of a one-seed suite,
    and the repeats seeded apart (they differ)."""
    from dataclasses import replace

    from pivotmerge.bench.modality import SharedVLModel, finetune_score, finetune_scores, model_config

    suite = replace(QUICK, finetune_steps=3, eval_size=64)
    torch.manual_seed(0)
    backbone = SharedVLModel(model_config(suite, multiway=False))
    twice = finetune_scores(backbone, replace(suite, finetune_seeds=2))
    once = finetune_scores(backbone, suite)
    for task in TASKS:
        first, second = finetune_score(backbone, suite, task, 0), finetune_score(backbone, suite, task, 1)
        assert once[task] == first
        assert twice[task] == pytest.approx((first + second) / 2)
    assert any(finetune_score(backbone, suite, t, 0) != finetune_score(backbone, suite, t, 1) for t in TASKS)


def test_the_study_does_not_depend_on_the_callers_thread_count(tmp_path):
    # A study of a few steps; before the study pinned one thread its points differed between 1 and 2 threads.
    micro = replace(QUICK, name="micro", seed_steps=(0, 20), specific_steps=10, finetune_steps=5, eval_size=32,
                    calibration_size=8)
    previous = torch.get_num_threads()
    points = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            points.append(run(micro, tmp_path / str(threads), lambda _: None)["points"])
            assert torch.get_num_threads() == threads  # the caller's setting is given back
    finally:
        torch.set_num_threads(previous)
    assert json.dumps(points[0], sort_keys=True) == json.dumps(points[1], sort_keys=True)
