"""Hub ids through a cache laid out as huggingface_hub lays it out; the model card; push up to the upload call."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, scan_cache_dir

from pivotmerge import merge
from pivotmerge.cli.main import main
from pivotmerge.repos.hub import push
from tests.repos.tiny_families import Built

SIDE_FILES = {"chat_template.json": json.dumps({"chat_template": "{{ messages }}"}),
              "video_preprocessor_config.json": "{}", "special_tokens_map.json": json.dumps({"bos_token": "<s>"})}


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """`source`'s files as huggingface_hub stores a downloaded revision: blobs by sha256, a
    snapshot of relative links, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(family_models: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    built = family_models["llava"]
    base = tmp_path / "base_with_side_files"
    shutil.copytree(built.base, base)
    for name, text in SIDE_FILES.items():
        (base / name).write_text(text)
    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny-llava", base, "a" * 40)
    cache_repo(cache, "org/tiny-llava-expert", built.experts[0], "b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_resolve_from_the_cache_and_the_card_names_them(hub_cache: Path, family_models: dict[str, Built],
                                                                tmp_path: Path) -> None:
    cached = {r.repo_id: [rev.commit_hash for rev in r.revisions] for r in scan_cache_dir(hub_cache).repos}
    assert cached == {"org/tiny-llava": ["a" * 40],
                      "org/tiny-llava-expert": ["b" * 40]}  # huggingface_hub reads our layout
    local_expert = family_models["llava"].experts[1]
    spec = {"method": "task_arithmetic", "base_model": "org/tiny-llava", "components": ["projector"], "device": "cpu",
            "models": [{"model": f"org/tiny-llava-expert@{'b' * 40}"}, {"model": str(local_expert)}]}
    report = merge(spec, tmp_path / "out").as_json()
    assert report["inputs"] == [
        {"field": "base_model", "model": "org/tiny-llava", "hub_id": "org/tiny-llava", "commit": "a" * 40},
        {"field": "models.0.model", "model": f"org/tiny-llava-expert@{'b' * 40}", "hub_id": "org/tiny-llava-expert",
         "commit": "b" * 40},
        {"field": "models.1.model", "model": str(local_expert)},
    ]
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == ["org/tiny-llava", "org/tiny-llava-expert"]  # hub ids only, never a local path
    assert card.data.base_model_relation == "merge" and card.data.pipeline_tag == "image-text-to-text"
    assert "merge" in card.data.tags and "task_arithmetic" in card.data.tags
    assert "```yaml\nmethod: task_arithmetic\nbase_model: org/tiny-llava\n" in card.text
    for name, text in SIDE_FILES.items():  # carried from the base
        assert (tmp_path / "out" / name).read_text() == text
    for name in ("generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_a_hub_id_missing_from_the_cache_is_one_line_with_downloads_off(hub_cache: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spec.yaml").write_text(
        "method: task_arithmetic\nbase_model: org/tiny-llava\nmodels:\n  - model: org/absent\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "spec.yaml", "-o", "out"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: models.0.model: org/absent: not in the Hugging Face cache ({hub_cache}) and downloads are off "
        f"(the CLI allows them with --allow-downloads, the service with PIVOTMERGE_HUB_ALLOW_DOWNLOADS=true)")
    assert not (tmp_path / "out").exists()


class RecordingHub:
    """Stands in for the Hugging Face Hub, which no test can reach: records what push would send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: object) -> str:
        self.calls.append(("upload_folder", dict(kwargs)))
        return "https://huggingface.co/org/merged/commit/0"


def test_push_sends_the_merged_folder_with_its_card(hub_cache: Path, tmp_path: Path) -> None:
    merge({"method": "linear", "models": [{"model": "org/tiny-llava"}, {"model": "org/tiny-llava-expert"}],
           "components": ["projector"], "device": "cpu"}, tmp_path / "out")
    hub = RecordingHub()
    push(tmp_path / "out", "org/merged", token=None, private=True, api=hub)
    assert hub.calls[0] == ("create_repo", {"repo_id": "org/merged", "private": True, "exist_ok": True})
    name, upload = hub.calls[1]
    assert name == "upload_folder" and upload["repo_id"] == "org/merged"
    assert upload["folder_path"] == str(tmp_path / "out")
    sent = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert {"README.md", "merge_report.json", "model.safetensors", "config.json", "chat_template.json"} <= set(sent)
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == ["org/tiny-llava", "org/tiny-llava-expert"]


def test_push_refuses_a_folder_that_is_not_a_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["push", str(tmp_path / "x"), "org/merged"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'x'}: not a merged model (no merge_report.json)"


def test_merge_with_push_to_hub_pushes_with_the_users_own_login(hub_cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from tests.hub_server import recording_hub

    (tmp_path / "spec.yaml").write_text("method: linear\ncomponents: [projector]\ndevice: cpu\n"
                                        "models: [{model: org/tiny-llava}, {model: org/tiny-llava-expert}]\n"
                                        "push_to_hub: {repo_id: org/merged}\n")
    monkeypatch.setenv("HF_TOKEN", "hf_users_token")
    with recording_hub() as (endpoint, record):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        main(["merge", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])
    assert record.created == [{"name": "merged", "organization": "org", "visibility": "public"}]
    assert set(record.authorizations) == {"Bearer hf_users_token"}
    [commit] = record.commits
    assert commit["files"]["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
