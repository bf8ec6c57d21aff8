"""The CLI: user errors exit 2 with one readable line; merge writes what the spec asks."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.repo_factory import llava_like, write_repo



def test_merge_reads_model_paths_relative_to_the_spec(tmp_path, run_cli):
    write_repo(tmp_path / "specs" / "a", llava_like(0))
    write_repo(tmp_path / "specs" / "b", {k: v * 3 for k, v in llava_like(0).items() if v.is_floating_point()}
               | {"vision_tower.embeddings.position_ids": llava_like(0)["vision_tower.embeddings.position_ids"]})
    (tmp_path / "specs" / "spec.yaml").write_text(
        "method: linear\nmodels:\n  - model: a\n  - model: b\ncomponents: [projector]\n")
    result = run_cli("merge", "specs/spec.yaml", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    w = llava_like(0)["multi_modal_projector.linear_2.weight"]
    assert torch.allclose(merged["multi_modal_projector.linear_2.weight"], 2 * w)
    assert "merged 4 of" in result.stderr


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, run_cli):
    (tmp_path / "bad.yaml").write_text("method: linear\nmodels:\n  - model: nowhere\nnoise: 1\n")
    (tmp_path / "notyaml.yaml").write_text("method: linear\nbase_model: a: b\n")
    cases = {
        "bad.yaml": "error: noise: Extra inputs are not permitted",
        "notyaml.yaml": "notyaml.yaml: line 2, column 14: not valid YAML: mapping values are not allowed here",
        "missing.yaml": "cannot read spec missing.yaml",
    }
    for file, message in cases.items():
        result = run_cli("merge", file, "-o", "out", cwd=tmp_path)
        assert result.returncode == 2, (file, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (file, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_methods_lists_each_method_in_80_columns_and_names_how_to_see_more(tmp_path, run_cli, monkeypatch):
    from pivotmerge.methods import all_methods

    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("methods", cwd=tmp_path)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    starts = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert starts[:len(all_methods())] == sorted(all_methods())  # one entry per method, its name whole
    assert len(lines) <= 3 * len(all_methods()) + 3 and "methods NAME" in result.stdout
    one = run_cli("methods", "ties", cwd=tmp_path).stdout
    assert max(len(line.rstrip()) for line in one.splitlines()) <= 80
    assert all(f"  {param}" in one for param in all_methods()["ties"].params.model_fields) and "tsv" not in one
    unknown = run_cli("methods", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown method 'nope'" in unknown.stderr


def test_methods_verbose_lists_every_registered_method_with_parameters(tmp_path, run_cli):
    from pivotmerge.methods import all_methods

    result = run_cli("methods", "--verbose", cwd=tmp_path)
    assert result.returncode == 0
    for name, method in all_methods().items():
        assert name in result.stdout
        for param in method.params.model_fields:
            assert param in result.stdout


def test_methods_marks_the_parameters_the_engine_sets(tmp_path, run_cli):
    import json

    result = run_cli("methods", "--json", cwd=tmp_path)
    listed = {m["name"]: m for m in json.loads(result.stdout)["methods"]}  # the body of GET /v1/methods
    assert listed["regmean"]["calibration_data"] == ["grams", "merged_input_grams", "cross_grams"]
    assert listed["pivotmerge"]["calibration_data"] == ["alignment", "grams", "merged_input_grams", "cross_grams",
                                                         "block_features", "caption_outputs"]
    assert listed["linear"]["calibration_data"] == []
    assert listed["pivotmerge"]["defaults_with_calibration"] == {
        "combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs", "off_diagonal_scale": 1.0,
        "spectrum": "keep", "residual_weight": 1.0, "scale_min": 1.0, "scale_max": 1.0}
    assert listed["linear"]["defaults_with_calibration"] == {}
    table = run_cli("methods", "--verbose", cwd=tmp_path).stdout
    assert "grams (set by the engine)" in table and "alignment (set by the engine)" in table
    assert "with data: 'keep'" in " ".join(table.split())  # however the line wraps


def test_the_service_contributes_its_commands_through_the_entry_point_group(tmp_path, run_cli):
    from pivotmerge.cli.main import COMMANDS, all_commands

    assert not any(target.startswith(("app.", "core.", "workers.")) for target in COMMANDS.values())
    assert {name: all_commands()[name] for name in ("serve", "quickstart", "admin")} == {
        "serve": "app.cli:serve", "quickstart": "app.cli:quickstart", "admin": "app.cli:admin"}
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.startswith("  ")}
    assert {"serve", "quickstart", "admin", "merge", "fold", "evaluate", "make-example"} <= listed
    assert "Not installed" not in result.stdout  # the test environment has the service


def test_merge_json_prints_the_report_as_written(tmp_path, run_cli):
    write_repo(tmp_path / "a", llava_like(0))
    write_repo(tmp_path / "b", llava_like(1))
    (tmp_path / "spec.yaml").write_text(
        "method: linear\nmodels:\n  - model: a\n  - model: b\ncomponents: [projector]\n")
    result = run_cli("merge", "spec.yaml", "-o", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((tmp_path / "out" / "merge_report.json").read_text())


def test_make_example_refuses_a_folder_that_is_not_empty_without_force(tmp_path, run_cli):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "notes.txt").write_text("mine")
    refused = run_cli("make-example", "ex", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "ex exists and is not empty" in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["notes.txt"]
    forced = run_cli("make-example", "ex", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and (tmp_path / "ex" / "pivotmerge.yaml").is_file()
    assert (tmp_path / "ex" / "notes.txt").read_text() == "mine"


def test_loading_a_model_shows_no_transformers_bars_and_leaves_them_as_they_were(tmp_path, capfd):
    """A merge with calibration or evaluation loads models inside our own progress bar (and a worker logs
    what a bar writes to stderr as WARNING lines)."""
    from transformers.utils import logging as transformers_logging

    from pivotmerge.data.evaluate import load_model
    from pivotmerge.data.example import make_example

    example = make_example(tmp_path / "ex", n_experts=1)
    transformers_logging.enable_progress_bar()
    load_model(example.base, "cpu")
    assert "Loading weights" not in "".join(capfd.readouterr())
    assert transformers_logging.is_progress_bar_enabled()  # as it was, for the caller's own loads
