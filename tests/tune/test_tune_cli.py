"""`pivotmerge tune` end to end on the example models: every trial recorded, the best trial written as
a normal merge output holding the study, its dev score what the written model scores, test scored
once for it; bad input is one line naming the field and leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.evaluate import evaluate_model
from pivotmerge.methods import get_method
from pivotmerge.report.merge_report import MergeReport, read_report


@pytest.fixture(scope="module")
def tuned(example, tmp_path_factory):
    """One study: two candidates on two dev sets, a test set, written to OUT (run in-process once)."""
    from pivotmerge.cli.main import main

    out = tmp_path_factory.mktemp("tuned") / "out"
    args = ["tune", str(example.spec), "--dev", str(example.datasets["shapes"]), "--dev", str(example.datasets["dots"]),
            "--methods", "task_arithmetic,ties", "--trials", "4", "--objective", "loss",
            "--test", str(example.datasets["stripes"]), "-o", str(out)]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code == 0
    return out, read_report(out)


def test_every_trial_is_recorded_and_the_best_one_is_chosen_on_dev(tuned):
    _, report = tuned
    study = report.study
    assert len(study.trials) == 4 and study.sampler == "tpe" and study.direction == "minimize"
    # Each candidate's defaults come first.
    assert [(t.label, t.params) for t in study.trials[:2]] == [("task_arithmetic", {"scale": 1.0}),
                                                               ("ties", {"scale": 1.0, "density": 1.0})]
    for t in study.trials:
        assert t.state in ("complete", "repeat") and t.method == t.label
        assert [d.dataset for d in t.dev] == ["shapes", "dots"]
        assert t.objective == pytest.approx(sum(d.caption_loss for d in t.dev) / 2)
        assert t.seconds > 0 or t.state == "repeat"
    best = min(study.trials, key=lambda t: t.objective)
    assert study.best == best.number
    assert report.method == best.method and report.spec["parameters"] == best.params


def test_the_output_is_the_best_trials_merge_and_scores_its_dev_figures(tuned, example):
    out, report = tuned
    study = report.study
    best = study.best_trial()
    # A normal merge output: weights, side files, a report whose tensors carry the chosen parameters.
    written = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "merge_report.json", "README.md", "study.png"} <= written
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fields = get_method(best.method).params.model_fields
    changed = {k: v for k, v in best.params.items() if v != fields[k].default}
    assert all(entry.params == changed for entry in report.layers)
    # The written model scores on dev exactly what the in-memory trial scored.
    dev = [load_dataset(example.datasets[d]) for d in ("shapes", "dots")]
    written = evaluate_model(out, dev, device="cpu")
    assert [m.caption_loss for m in written] == pytest.approx([d.caption_loss for d in best.dev], rel=1e-6)
    # Unmerged tensors are the base's.
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(example.base / "model.safetensors"))
    assert all(torch.equal(merged[n], base[n]) for n in base if "multi_modal_projector" not in n)
    assert any(not torch.equal(merged[n], base[n]) for n in base if "multi_modal_projector" in n)


def test_test_sets_are_scored_once_for_the_best_trial_beside_dev(tuned, example):
    out, report = tuned
    study = report.study
    assert study.test == [str(example.datasets["stripes"].resolve())]
    assert list(report.evaluation) == ["merged"] and study.best_test == report.evaluation["merged"]
    assert [m.dataset for m in study.best_test] == ["stripes"]
    assert all(d.dataset != "stripes" for t in study.trials for d in t.dev)  # test never scored a trial
    [expected] = evaluate_model(out, [load_dataset(example.datasets["stripes"])], device="cpu")
    assert study.best_test[0].caption_loss == pytest.approx(expected.caption_loss, rel=1e-6)


def test_a_small_discrete_space_runs_as_a_grid(example, run_cli, tmp_path):
    spec = yaml.safe_load(example.spec.read_text())
    spec["tune"] = {"space": {"ties": {"scale": [0.5, 1.0], "density": 0.5}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = run_cli("tune", "spec.yaml", "--dev", str(example.datasets["dots"]), "--trials", "10", "--json", "-o",
                     "out",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = MergeReport.model_validate(json.loads(result.stdout)).study
    assert study.sampler == "grid" and study.stopped == "grid"
    assert [t.params for t in study.trials] == [{"density": 0.5, "scale": 0.5}, {"density": 0.5, "scale": 1.0}]
    assert "best trials of 2" not in result.stdout  # --json prints the report only


@pytest.mark.parametrize(("args", "space", "message"), [
    (["--methods", "task_arithmetic,nope"], None, "error: --methods: unknown merge method 'nope'"),
    ([], {"ties": {"sharpness": [1, 2]}}, "error: tune.space.ties.sharpness: not a parameter of 'ties'"),
    (["--dev", "empty.jsonl"], None, "error: dev.0: dataset /"),
    (["--no-dev"], None, "error: --dev: give at least one dev dataset"),
    (["--objective", "qa", "--dev", "noqa.jsonl"], None, "error: objective: qa needs dev records with a question"),
])
def test_bad_input_is_one_line_naming_the_field_and_writes_nothing(example, run_cli, tmp_path, args, space, message):
    spec = yaml.safe_load(example.spec.read_text())
    if space is not None:
        spec["tune"] = {"space": space}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "empty.jsonl").write_text("\n")
    shapes = example.datasets["shapes"]
    (tmp_path / "noqa.jsonl").write_text("".join(
        json.dumps({"image": str((shapes.parent / r["image"]).resolve()), "caption": r["caption"]}) + "\n"
        for r in map(json.loads, shapes.read_text().splitlines())))
    dev = [] if "--no-dev" in args else (["--dev", str(shapes)] if "--dev" not in args else [])
    result = run_cli("tune", "spec.yaml", *[a for a in args if a != "--no-dev"], *dev, "-o", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
