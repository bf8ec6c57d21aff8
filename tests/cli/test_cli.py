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
    (tmp_path / "specs" / "spec.yaml").write_text("method: linear\nmodels:\n  - model: a\n  - model: b\ncomponents: [projector]\n")
    result = run_cli("merge", "specs/spec.yaml", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    w = llava_like(0)["multi_modal_projector.linear_2.weight"]
    assert torch.allclose(merged["multi_modal_projector.linear_2.weight"], 2 * w)
    assert "merged 4 of" in result.stderr


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path, run_cli):
    (tmp_path / "bad.yaml").write_text("method: linear\nmodels:\n  - model: nowhere\nnoise: 1\n")
    (tmp_path / "notyaml.yaml").write_text("method: [unclosed\n")
    cases = {
        "bad.yaml": "error: noise: Extra inputs are not permitted",
        "notyaml.yaml": "not valid YAML",
        "missing.yaml": "cannot read spec missing.yaml",
    }
    for file, message in cases.items():
        result = run_cli("merge", file, "-o", "out", cwd=tmp_path)
        assert result.returncode == 2, (file, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (file, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_methods_lists_every_registered_method_with_parameters(tmp_path, run_cli):
    from pivotmerge.methods import all_methods

    result = run_cli("methods", cwd=tmp_path)
    assert result.returncode == 0
    for name, method in all_methods().items():
        assert name in result.stdout
        for param in method.params.model_fields:
            assert param in result.stdout


def test_methods_marks_the_parameters_the_engine_sets(tmp_path, run_cli):
    import json

    result = run_cli("methods", "--json", cwd=tmp_path)
    listed = json.loads(result.stdout)
    assert listed["regmean"]["engine_params"] == ["grams", "cross_grams"]
    assert listed["pivotmerge"]["engine_params"] == ["alignment", "grams", "cross_grams", "block_features", "caption_outputs"]
    assert listed["linear"]["engine_params"] == []
    assert listed["pivotmerge"]["defaults_with_calibration"] == {
        "combine": "gram", "gram_inputs": "merged", "off_diagonal_scale": 1.0, "spectrum": "keep", "residual_weight": 1.0,
        "scale_min": 1.0}
    assert listed["linear"]["defaults_with_calibration"] == {}
    table = run_cli("methods", cwd=tmp_path).stdout
    assert "grams (set by the engine)" in table and "alignment (set by the engine)" in table
    assert "with data: 'keep'" in table


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
    (tmp_path / "spec.yaml").write_text("method: linear\nmodels:\n  - model: a\n  - model: b\ncomponents: [projector]\n")
    result = run_cli("merge", "spec.yaml", "-o", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads((tmp_path / "out" / "merge_report.json").read_text())
