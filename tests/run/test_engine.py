"""The streaming engine: what it reads, what it refuses, and what it writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pivotmerge
from pivotmerge.errors import CompatibilityError, MergeCancelled, PivotMergeError, RepoError, SpecError
from pivotmerge.repos.model_repo import ModelRepo
from tests.repo_factory import llava_like, write_repo

P1W = "multi_modal_projector.linear_1.weight"


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = write_repo(tmp_path / "base", llava_like(0), extra_files={"tokenizer.json": "{}", "chat_template.jinja": "x"})
    e1 = write_repo(tmp_path / "e1", {k: v + 1 if "projector" in k else v for k, v in llava_like(0).items()})
    e2 = write_repo(tmp_path / "e2", {k: v * 3 if "projector" in k else v for k, v in llava_like(0).items()}, shards=3)
    return base, e1, e2


def spec_for(base: Path, *models: Path, **extra: object) -> dict:
    return {"method": "linear", "base_model": str(base), "models": [{"model": str(m)} for m in models], **extra}


def test_linear_merge_of_projector_keeps_the_rest_of_the_base(trio, tmp_path):
    base, e1, e2 = trio
    out = tmp_path / "out"
    spec = spec_for(base, e1, e2, components=["projector"])
    spec["models"][1]["weight"] = 3.0
    report = pivotmerge.merge(spec, out)
    merged = load_file(str(out / "model.safetensors"))
    src = llava_like(0)
    # (1 * (W + 1) + 3 * (3 W)) / 4
    assert torch.allclose(merged[P1W], (src[P1W] + 1 + 9 * src[P1W]) / 4, atol=1e-6)
    for name in ("vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.embeddings.position_ids"):
        assert torch.equal(merged[name], src[name])
    assert report.tensors.model_dump() == {"total": len(src), "merged": 4, "copied": len(src) - 4}
    assert {e.tensor for e in report.layers} == {n for n in src if "projector" in n}
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "chat_template.jinja").exists()
    assert json.loads((out / "merge_report.json").read_text())["method"] == "linear"
    assert "linear" in (out / "README.md").read_text()


def test_sharded_output_has_an_index_and_recorded_sha256(trio, tmp_path):
    base, e1, e2 = trio
    out = tmp_path / "out"
    report = pivotmerge.merge(spec_for(base, e1, e2, out_shard_size=100), out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(llava_like(0))
    assert len(report.files) > 1
    for f in report.files:
        data = (out / f.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size
    repo = ModelRepo.open(str(out))
    assert torch.allclose(repo.get(P1W), (llava_like(0)[P1W] + 1 + 3 * llava_like(0)[P1W]) / 2, atol=1e-6)


def test_output_dtype_is_converted_and_recorded_in_config(trio, tmp_path):
    base, e1, e2 = trio
    pivotmerge.merge(spec_for(base, e1, e2, dtype="bfloat16"), tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged[P1W].dtype == torch.bfloat16
    assert merged["vision_tower.embeddings.position_ids"].dtype == torch.int64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_depth_list_and_filtered_weights_resolve_per_tensor(trio, tmp_path):
    base, e1, _ = trio
    spec = spec_for(base, base, e1, components=["projector"])
    # weight of e1 goes 0 -> 1 across the projector's two layers; bias tensors pinned to 0.5 by a filter
    spec["models"][1]["weight"] = [{"filter": r"bias$", "value": 0.5}, {"value": [0.0, 1.0]}]
    report = pivotmerge.merge(spec, tmp_path / "out")
    weights = {e.tensor: e.weights for e in report.layers}
    assert weights[P1W] == [1.0, 0.0]
    assert weights["multi_modal_projector.linear_2.weight"] == [1.0, 1.0]
    assert weights["multi_modal_projector.linear_1.bias"] == [1.0, 0.5]


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(RepoError, match="pickled weights.*never unpickles"):
        pivotmerge.check({"method": "linear", "models": [{"model": str(folder)}]})
    assert not marker.exists()


def test_repos_outside_allowed_roots_are_refused_even_through_symlinks(trio, tmp_path):
    base, e1, _ = trio
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(e1, root / "link")
    spec = {"method": "linear", "models": [{"model": str(root / "link")}]}
    with pytest.raises(RepoError, match=r"^models\.0\.model: .*outside the allowed roots"):
        pivotmerge.check(spec, allowed_roots=[root])
    with pytest.raises(RepoError, match=r"^models\.0\.model: cannot read .*too long"):
        pivotmerge.check({"method": "linear", "models": [{"model": "x" * 5000}]})
    pivotmerge.check(spec, allowed_roots=[tmp_path])


def test_hub_ids_resolve_from_the_local_cache_only(trio, tmp_path, monkeypatch):
    base, _, _ = trio
    COMMIT = "abc123" * 6 + "ab12"  # a commit sha: 40 hex digits
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    snap.parent.mkdir(parents=True)
    os.symlink(base, snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert ModelRepo.open("org/tiny").path == base.resolve()
    assert ModelRepo.open(f"org/tiny@{COMMIT}").path == base.resolve()
    with pytest.raises(RepoError, match="not in the Hugging Face cache"):
        ModelRepo.open("org/absent")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(P1W), rf"e1: tensor {P1W} is missing"),
        (lambda t: t.update({P1W: torch.zeros(2, 2)}), rf"e1: tensor {P1W} has shape \[2, 2\]"),
        (lambda t: t.update({P1W: t[P1W].half()}), rf"e1: tensor {P1W} has dtype torch.float16"),
    ],
)
def test_incompatible_models_name_the_repo_and_tensor(tmp_path, change, message):
    base = write_repo(tmp_path / "base", llava_like(0))
    tensors = llava_like(1)
    change(tensors)
    e1 = write_repo(tmp_path / "e1", tensors)
    with pytest.raises(CompatibilityError, match=message):
        pivotmerge.check({"method": "linear", "base_model": str(base), "models": [{"model": "e1"}]}, relative_to=tmp_path)


def test_architecture_mismatch_is_an_error(tmp_path):
    base = write_repo(tmp_path / "base", llava_like(0))
    other = write_repo(tmp_path / "other", llava_like(0), model_type="qwen2_vl")
    with pytest.raises(CompatibilityError, match="architecture 'qwen2_vl' differs"):
        pivotmerge.check(spec_for(base, other))


def test_cancel_leaves_no_output_and_no_partial_folder(trio, tmp_path):
    base, e1, e2 = trio
    calls = []

    def cancel_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(MergeCancelled):
        pivotmerge.merge(spec_for(base, e1, e2), tmp_path / "out", should_cancel=cancel_after_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "e1", "e2"]


def test_an_existing_output_folder_is_kept_unless_overwrite(trio, tmp_path):
    base, e1, e2 = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PivotMergeError, match="exists and is not empty"):
        pivotmerge.merge(spec_for(base, e1, e2), out)
    assert (out / "keep.txt").read_text() == "mine"
    pivotmerge.merge(spec_for(base, e1, e2), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_parameter_values_are_checked_for_every_merged_tensor_before_merging(trio, tmp_path):
    base, e1, e2 = trio
    bad_choice = spec_for(base, e1, e2, method="pivotmerge", parameters={"spectrum": "sideways"})
    with pytest.raises(SpecError, match=r"^parameters\.spectrum: Input should be 'keep', 'flatten' or 'flatten_total' \(for tensor "):
        pivotmerge.check(bad_choice)
    # A filtered value that is out of range only for the second projector layer is found too.
    out_of_range = spec_for(base, e1, e2, method="regmean", components=["projector"],
                            parameters={"alpha": [{"filter": "linear_2", "value": 2.0}, {"value": 0.9}]})
    with pytest.raises(SpecError, match=r"^parameters\.alpha: .*less than or equal to 1 \(for tensor .*linear_2"):
        pivotmerge.check(out_of_range)
    with pytest.raises(SpecError, match=r"^parameters\.spectrum"):
        pivotmerge.merge(bad_choice, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "e1", "e2"]


def test_spec_errors_name_the_field_before_any_tensor_is_read(tmp_path):
    with pytest.raises(SpecError, match=r"^models\.0\.parameters\.density: not a per-model parameter of 'linear'"):
        pivotmerge.check({"method": "linear", "models": [{"model": "/nonexistent", "parameters": {"density": 0.5}}]})
    with pytest.raises(SpecError, match=r"^components\.0: "):
        pivotmerge.check({"method": "linear", "models": [{"model": "/nonexistent"}], "components": ["wheels"]})
    with pytest.raises(SpecError, match=r"^out_shard_size: .*not a size"):
        pivotmerge.check({"method": "linear", "models": [{"model": "/nonexistent"}], "out_shard_size": "lots"})


def test_a_merge_parses_its_spec_once_and_opens_each_repo_once(trio, tmp_path, monkeypatch):
    """The spec is parsed once per process: the merge path plans once, and its later stages read that plan."""
    import pivotmerge.plan.plan as planning
    from pivotmerge.spec.schema import MergeSpec

    parsed: list[dict] = []
    opened: list[str] = []
    validate, open_repo = MergeSpec.model_validate, planning._open_repo

    def counted_validate(data, *args, **kwargs):
        parsed.append(data)
        return validate(data, *args, **kwargs)

    def counted_open(ref, *args, **kwargs):
        opened.append(ref)
        return open_repo(ref, *args, **kwargs)

    monkeypatch.setattr(MergeSpec, "model_validate", counted_validate)
    monkeypatch.setattr(planning, "_open_repo", counted_open)
    base, e1, e2 = trio
    pivotmerge.merge(spec_for(base, e1, e2), tmp_path / "out")
    assert len(parsed) == 1
    assert opened == [str(base), str(e1), str(e2)]
