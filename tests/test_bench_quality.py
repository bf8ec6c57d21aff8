"""The quality benchmark's quick mode, end to end through the CLI.

It checks the suite cannot silently become trivial: each expert must be clearly
best on its own domain, and the joint projector must beat the average expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.merging import VARIANTS
from pivotmerge.bench.quality import Config
from pivotmerge.cli.main import main

# Own-domain token accuracy must exceed every other expert's by this much.
SPECIALISATION_MARGIN = 0.05
# A world built in seconds, for the tests of how worlds are built and scored.
TINY = Config(seeds=1, n_train=8, n_dev=4, n_test=6, n_calib=4, n_warm=4, warm_steps=2, vision_steps=2,
              lm_steps=2, expert_steps=2, joint_steps=2, short_steps=1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "quality"
    main(["bench", "quality", "--quick", "--out", str(out)])
    return out


def _table(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["table"]


def _accuracy(row: dict, domain: str) -> float:
    return row[domain]["token_accuracy"]["mean"]


def test_writes_table_plot_and_raw_scores(quick_run: Path) -> None:
    for name in ("results.md", "results.json", "raw_scores.json", "accuracy_by_domain.png"):
        assert (quick_run / name).stat().st_size > 0, name
    assert (quick_run / "accuracy_by_domain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _table(quick_run)
    expected = ["base"] + [f"expert_{d}" for d in DOMAINS] + ["joint", "task_vector_oracle"] + [v.name for v in VARIANTS]
    assert list(table) == expected
    for row in table.values():
        assert set(row) == {*DOMAINS, "average"}
    markdown = (quick_run / "results.md").read_text()
    for name in expected:
        assert f"| {name} |" in markdown


def test_experts_are_specialised(quick_run: Path) -> None:
    table = _table(quick_run)
    for domain in DOMAINS:
        own = _accuracy(table[f"expert_{domain}"], domain)
        others = max(_accuracy(table[f"expert_{d}"], domain) for d in DOMAINS if d != domain)
        assert own > others + SPECIALISATION_MARGIN, (domain, own, others)


def test_joint_projector_beats_the_average_expert(quick_run: Path) -> None:
    table = _table(quick_run)
    experts = [_accuracy(table[f"expert_{d}"], "average") for d in DOMAINS]
    assert _accuracy(table["joint"], "average") > sum(experts) / len(experts)


def test_hyperparameter_search_is_recorded_on_dev(quick_run: Path) -> None:
    rows = json.loads((quick_run / "raw_scores.json").read_text())[0]["rows"]
    for variant in VARIANTS:
        search = rows[variant.name]["search"]
        assert [s["params"] for s in search] == variant.candidates()
        best = max(search, key=lambda s: s["dev_token_accuracy"])
        assert rows[variant.name]["params"] == best["params"]


def test_metric_correlations_cover_every_metric(quick_run: Path) -> None:
    result = json.loads((quick_run / "results.json").read_text())
    for rho in result["spearman"].values():
        assert {"l2", "cosine", "sign_dissimilarity", "soft_sign_dissimilarity", "truncated_sign_dissimilarity"} <= set(rho)
        assert all(-1 <= v <= 1 for v in rho.values())


def test_pivotmerge_data_refit_fits_fc2_on_the_merged_fc1() -> None:
    # gram_inputs: merged with everything that scales or filters off: fc1's inputs are the vision
    # features either way, so fc1 is RegMean's closed form; fc2 is the least-squares fit of every
    # expert's fc2 outputs (on its own hidden activations) from the merged fc1's hidden activations.
    import torch

    from pivotmerge.bench.merging import Calibration, merge
    from pivotmerge.bench.models import Projector, layer_inputs
    from pivotmerge.methods.regmean import regmean_solve

    torch.manual_seed(0)
    base = Projector().state_dict()
    experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    feats = [torch.randn(20, 4, 32) for _ in experts]
    inputs = [layer_inputs(e, f) for e, f in zip(experts, feats)]
    grams = [{layer: x.T @ x for layer, x in own.items()} for own in inputs]
    calibration = Calibration(grams, {"fc1": [1.0] * 3, "fc2": [1.0] * 3}, inputs, feats)
    variant = next(v for v in VARIANTS if v.name == "pivotmerge_data")
    params = {**variant.fixed, "gram_inputs": "merged", "lambda_max": 1 / 3, "lambda_min": 1 / 3, "spectrum": "keep",
              "residual_weight": 1.0, "gram_alpha": 1.0}
    assert variant.grid["gram_inputs"] == ["expert", "merged"]  # the dev search weighs the refit against RegMean's inputs
    merged = merge(variant, params, experts, base, calibration)
    regmean = regmean_solve([e["fc1.weight"] for e in experts], [g["fc1"] for g in grams], [1.0] * 3, 1.0)
    assert torch.allclose(merged["fc1.weight"], regmean, atol=1e-4)
    hidden = [layer_inputs(merged, f)["fc2"] for f in feats]
    targets = [own["fc2"] @ e["fc2.weight"].T for own, e in zip(inputs, experts)]
    fit = torch.linalg.lstsq(torch.cat(hidden).double(), torch.cat(targets).double()).solution.T
    assert torch.allclose(merged["fc2.weight"].double(), fit, atol=1e-3)
    expert_inputs = merge(variant, {**params, "gram_inputs": "expert"}, experts, base, calibration)
    assert not torch.allclose(expert_inputs["fc2.weight"], merged["fc2.weight"], atol=1e-3)


def test_one_seed_builds_one_world() -> None:
    # Reruns of the command must give the same table: every random draw is seeded (the towers'
    # initial weights once came from the unseeded global generator and moved rows by 2 points).
    import torch

    from pivotmerge.bench.quality import build_world

    torch.manual_seed(123)  # whatever the global generator held before must not matter
    first = build_world(TINY, 0, lambda _: None)
    second = build_world(TINY, 0, lambda _: None)
    other = build_world(TINY, 1, lambda _: None)
    for key in first.base:
        assert torch.equal(first.base[key], second.base[key]) and torch.equal(first.joint[key], second.joint[key])
    for a, b in zip(first.lm.state_dict().values(), second.lm.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(first.splits["dev"]["shapes"].feats, second.splits["dev"]["shapes"].feats)
    assert not torch.equal(first.base["fc1.weight"], other.base["fc1.weight"])


def test_task_vector_oracle_recovers_a_joint_update_inside_the_experts_span() -> None:
    import torch

    from pivotmerge.bench.quality import task_vector_oracle

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    inside = {k: base[k] + 0.3 * (experts[0][k] - base[k]) - 0.5 * (experts[2][k] - base[k]) for k in base}
    oracle = task_vector_oracle(experts, base, inside)
    for k in base:
        assert torch.allclose(oracle[k], inside[k], atol=1e-5)
    # Outside the span it keeps only the projection: the residual is orthogonal to every task vector.
    outside = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    residual = task_vector_oracle(experts, base, outside)["w"] - outside["w"]
    for e in experts:
        assert abs(float((residual * (e["w"] - base["w"])).sum())) < 1e-4


def test_layer_attribution_splits_the_difference_by_layer() -> None:
    # Ours differs from theirs in fc1 only: swapping fc1 into theirs gives ours, so the fc1 entry
    # is the whole difference and fc2's is nothing; the total is the two rows' scores apart.
    import torch

    from pivotmerge.bench.quality import build_world, layer_attribution, score

    world = build_world(TINY, 0, lambda _: None)
    g = torch.Generator().manual_seed(0)
    theirs = world.base
    ours = {k: v + (torch.randn(v.shape, generator=g) if k.startswith("fc1") else 0) for k, v in theirs.items()}
    got = layer_attribution(ours, theirs, world)
    accuracy = {name: score(s, world, "test")["average"]["token_accuracy"] for name, s in (("ours", ours), ("theirs", theirs))}
    assert got["total"] == accuracy["ours"] - accuracy["theirs"] != 0
    assert got["fc1"] == got["total"] and got["fc2"] == 0


def test_rival_is_the_best_baseline_on_dev() -> None:
    from pivotmerge.bench.quality import rival

    rows = {"tsv": {"search": [{"dev_token_accuracy": 0.61}, {"dev_token_accuracy": 0.70}]},
            "iso_c": {"search": [{"dev_token_accuracy": 0.69}]},
            "linear": {"search": [{"dev_token_accuracy": 0.71}]}}
    assert rival(rows, ("tsv", "iso_c")) == "tsv"
    assert rival(rows, ("tsv", "iso_c", "linear")) == "linear"


def test_layer_attribution_is_reported_per_seed(quick_run: Path) -> None:
    from pivotmerge.bench.quality import DATA_FREE_BASELINES

    result = json.loads((quick_run / "results.json").read_text())
    rows = json.loads((quick_run / "raw_scores.json").read_text())[0]["rows"]
    [comparisons] = result["layer_attribution"]
    free, data = comparisons
    best_dev = {n: max(s["dev_token_accuracy"] for s in rows[n]["search"]) for n in DATA_FREE_BASELINES}
    assert (free["ours"], free["theirs"]) == ("pivotmerge", max(best_dev, key=best_dev.get))
    assert (data["ours"], data["theirs"]) == ("pivotmerge_data", "regmean")
    for c in comparisons:
        total = rows[c["ours"]]["test"]["average"]["token_accuracy"] - rows[c["theirs"]]["test"]["average"]["token_accuracy"]
        assert abs(c["test_token_accuracy"]["total"] - total) < 1e-9
        assert set(c["test_token_accuracy"]) == {"total", "fc1", "fc2"}
    assert f"| 0 | pivotmerge_data | regmean | {data['test_token_accuracy']['total']:+.4f} |" in (quick_run / "results.md").read_text()


def test_experts_and_joint_train_at_the_configs_rate() -> None:
    # Config.lr drives the experts and the joint projector (benchmarks/quality_regimes.py varies it):
    # at rate 0 Adam moves nothing, so every expert and the joint projector stay at the shared start.
    from dataclasses import replace

    import torch

    from pivotmerge.bench.quality import build_world

    frozen = build_world(replace(TINY, lr=0.0), 0, lambda _: None)
    for state in [frozen.joint, *frozen.experts[2]]:
        assert all(torch.equal(state[k], frozen.base[k]) for k in frozen.base)
    trained = build_world(TINY, 0, lambda _: None)
    assert not torch.equal(trained.joint["fc1.weight"], trained.base["fc1.weight"])
