"""The quality suites' quick modes, end to end through the CLI, and the gates that keep them informative.

The gates (issue 13), the same for the projector suite and the deep suite (where
alignment also trained the language model and the tower's top layers): each
expert beats every other expert on its own domain by 0.15 token accuracy; tuned
task arithmetic beats the shared initialisation by 0.15; the joint model beats
tuned task arithmetic by 0.08. A suite that fails them can no longer tell merge
methods apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.quality import DEEP_WORLD, OWN_DOMAINS, Scorer, spec_for
from pivotmerge.bench.variants import DEFAULTS, QUICK_ROWS, TUNED
from pivotmerge.bench.world import Config, build_world
from pivotmerge.cli.main import main
from pivotmerge.spec.schema import spec_from_dict

SPECIALISATION = 0.15
TASK_ARITHMETIC_OVER_BASE = 0.15
JOINT_OVER_TASK_ARITHMETIC = 0.08
# A world built in seconds, for the tests of how worlds are built and cached.
MICRO = Config(n_train=8, n_dev=4, n_test=4, n_calib=4, vision_steps=2, lm_steps=2, expert_steps=2, batch=4)
MICRO_DEEP = replace(MICRO, vision_layers=DEEP_WORLD.vision_layers, text_layers=2, trains=DEEP_WORLD.trains)


@pytest.fixture(scope="module", params=["projector", "deep"])
def quick_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(f"bench-{request.param}")
    # CI builds the world afresh; PIVOTMERGE_BENCH_CACHE lets a developer reuse worlds already built.
    cache = os.environ.get("PIVOTMERGE_BENCH_CACHE", str(root / "worlds"))
    main(["bench", "quality", "--suite", request.param, "--quick", "--out", str(root / "out"), "--cache", cache])
    return root / "out"


def _quick_rows(out: Path) -> list[str]:
    return _result(out)["suite"]["quick_rows"]


def _result(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _acc(row: dict, domain: str = "average") -> float:
    return row[domain]["token_accuracy"]["mean"]


def test_writes_both_tables_plot_and_raw_scores(quick_run: Path) -> None:
    for name in ("results.md", "results.json", "raw_scores.json", "accuracy_by_domain.png"):
        assert (quick_run / name).stat().st_size > 0, name
    assert (quick_run / "accuracy_by_domain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = _result(quick_run)
    assert list(result["reference"]) == ["base", *(f"expert_{d}" for d in DOMAINS), "joint", OWN_DOMAINS]
    for d in DOMAINS:  # the own-domain row is each expert's own score
        assert result["reference"][OWN_DOMAINS][d] == result["reference"][f"expert_{d}"][d]
    assert set(_quick_rows(quick_run)) <= set(QUICK_ROWS) and "task_arithmetic" in _quick_rows(quick_run)
    assert list(result["tuned"]) == [v.name for v in TUNED if v.name in _quick_rows(quick_run)]
    assert list(result["defaults"]) == [v.name for v in DEFAULTS if v.name in _quick_rows(quick_run)]
    markdown = (quick_run / "results.md").read_text()
    for name in [*result["tuned"], "pivotmerge - best data-free baseline (dev-chosen per seed)"]:
        assert f"| {name} |" in markdown
    # Every distance metric, where the suite merges domain subsets (the deep quick mode does not).
    assert len(result["spearman"].get("pivotmerge", {})) == (6 if result["suite"]["scenarios"] else 0)
    assert set(result["merge_seconds"]) == set(result["tuned"])


def test_each_expert_is_best_on_its_own_domain(quick_run: Path) -> None:
    ref = _result(quick_run)["reference"]
    for d in DOMAINS:
        others = max(_acc(ref[f"expert_{o}"], d) for o in DOMAINS if o != d)
        assert _acc(ref[f"expert_{d}"], d) >= others + SPECIALISATION, (d, _acc(ref[f"expert_{d}"], d), others)


def test_merging_matters_and_leaves_room(quick_run: Path) -> None:
    result = _result(quick_run)
    ta = _acc(result["tuned"]["task_arithmetic"])
    assert ta >= _acc(result["reference"]["base"]) + TASK_ARITHMETIC_OVER_BASE, result["gates"]
    assert _acc(result["reference"]["joint"]) >= ta + JOINT_OVER_TASK_ARITHMETIC, result["gates"]


def test_each_tuned_row_is_the_dev_choice_of_its_recorded_search(quick_run: Path) -> None:
    raw = json.loads((quick_run / "raw_scores.json").read_text())[0]
    grids = {v.name: v.candidates() for v in TUNED}
    for name, row in raw["tuned"].items():
        assert [s["params"] for s in row["search"]] == grids[name]
        best = max(row["search"], key=lambda s: s["dev_token_accuracy"])
        assert row["params"] == best["params"], name


def test_data_rows_give_each_expert_its_own_calibration_set(tmp_path: Path) -> None:
    world = build_world(MICRO, 0, tmp_path)
    variant = next(v for v in DEFAULTS if v.name == "pivotmerge_data")
    spec = spec_from_dict(spec_for(world, variant, dict(variant.fixed)))
    assert spec.parameters == {}  # the bar's "calibration data and no parameters"
    assert [m.calibration.dataset for m in spec.models] == [str(world.dataset("calib", d)) for d in DOMAINS]
    assert [m.model for m in spec.models] == [str(world.experts[d]) for d in DOMAINS]


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_one_seed_builds_one_world_and_a_built_world_is_reused(tmp_path: Path) -> None:
    first, second = build_world(MICRO, 3, tmp_path / "a"), build_world(MICRO, 3, tmp_path / "b")
    for a, b in [(first.base, second.base), (first.joint, second.joint),
                 *((first.experts[d], second.experts[d]) for d in DOMAINS)]:
        assert _digest(a) == _digest(b)
    assert (first.dataset("test", "dots").read_text() == second.dataset("test", "dots").read_text())
    assert Scorer(first)(first.experts["dots"], "test") == Scorer(second)(second.experts["dots"], "test")
    built = (first.base / "model.safetensors").stat().st_mtime_ns
    assert build_world(MICRO, 3, tmp_path / "a").root == first.root
    assert (first.base / "model.safetensors").stat().st_mtime_ns == built
    assert _digest(build_world(MICRO, 4, tmp_path / "a").experts["dots"]) != _digest(first.experts["dots"])


def test_a_world_does_not_depend_on_the_callers_thread_count(tmp_path: Path) -> None:
    # Before worlds were built on one thread, this micro world's experts differed between 1 and 2 threads.
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = build_world(MICRO, 5, tmp_path / "two")
        assert torch.get_num_threads() == 2  # the caller's setting is given back
        torch.set_num_threads(1)
        one = build_world(MICRO, 5, tmp_path / "one")
    finally:
        torch.set_num_threads(previous)
    for a, b in [(one.base, two.base), (one.joint, two.joint), *((one.experts[d], two.experts[d]) for d in DOMAINS)]:
        assert _digest(a) == _digest(b), a.name


def test_deep_experts_train_the_language_model_and_the_towers_top_layers(tmp_path: Path) -> None:
    """What the deep world's alignment trained is what its merges span: every language-model tensor the
    captions reach, and the two tower layers just below LLaVA's feature layer (-2 of 4: layers 1 and 2)."""
    world = build_world(MICRO_DEEP, 0, tmp_path)
    base, expert = load_file(world.base / "model.safetensors"), load_file(world.experts["dots"] / "model.safetensors")
    changed = {k for k in base if not (base[k] == expert[k]).all()}
    tower = {k for k in changed if k.startswith("model.vision_tower.")}
    assert {k.split(".")[4] for k in tower} == {"1", "2"}, sorted(tower)  # model.vision_tower.encoder.layers.<i>.
    assert {k for k in base if k.startswith("model.vision_tower.encoder.layers.1.")} <= tower
    assert {k for k in base if k.startswith("model.multi_modal_projector.")} <= changed
    assert {k for k in base if k.startswith("model.language_model.layers.")} <= changed
    assert "lm_head.weight" in changed
    spec = spec_from_dict(spec_for(world, next(v for v in DEFAULTS if v.name == "pivotmerge"), {}))
    assert [c.value for c in spec.components] == ["projector", "language_model", "vision_tower"]
