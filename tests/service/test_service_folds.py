"""Folds as a job kind (/v1/folds, workers.kinds.fold): a fold of the modality-specific VL transformer
run by a real worker through the API, its artifacts, metrics and isolation, and bad fold specs refused
before acceptance with the field named."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from service_core.settings import Settings
from pivotmerge.models.multiway import MultiwayVLConfig, MultiwayVLModel, SharedVLModel
from tests.service.service_support import wait_final

SIZES = dict(hidden_size=8, num_layers=3, num_heads=2, vl_layers=2, image_size=8, patch_size=4, vocab_size=10,
             max_text_len=4)


@pytest.fixture(scope="module")
def multiway(settings: Settings) -> Path:
    """A tiny modality-specific model under the allowed root, with distinct experts."""
    torch.manual_seed(0)
    model = MultiwayVLModel(MultiwayVLConfig(**SIZES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = settings.allowed_roots[0] / f"multiway-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(folder)
    return folder


def test_a_fold_job_runs_end_to_end(client: TestClient, worker, team, other_team, multiway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    accepted = client.post("/v1/folds", json={"spec": {"model": str(multiway), "method": "interpolation"}},
                           headers=team)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert accepted.headers["Location"] == f"/v1/folds/{job['id']}" and job["kind"] == "fold"

    done = wait_final(client, f"/v1/folds/{job['id']}", team)
    assert done["state"] == "succeeded", done
    artifacts = client.get(f"/v1/folds/{job['id']}/artifacts", headers=team).json()["artifacts"]
    assert {"config.json", "model.safetensors", "fold_report.json", "README.md"} <= {a["name"] for a in artifacts}
    for artifact in artifacts:
        content = client.get(artifact["url"], headers=team).content
        assert hashlib.sha256(content).hexdigest() == artifact["sha256"] and len(content) == artifact["size"]
        (tmp_path / artifact["name"]).write_bytes(content)

    # The folded folder is the shared model; a lower block's FFN is the mean of the v and l experts'.
    folded = SharedVLModel.from_pretrained(tmp_path)
    source = load_file(multiway / "model.safetensors")
    expected = (source["blocks.0.mlp.v.fc1.weight"] + source["blocks.0.mlp.l.fc1.weight"]) / 2
    assert torch.allclose(folded.state_dict()["blocks.0.mlp.fc1.weight"], expected, atol=1e-7)

    metrics = client.get(f"/v1/folds/{job['id']}/metrics", headers=team).json()["metrics"]
    report = client.get(f"/v1/folds/{job['id']}/artifacts/fold_report.json", headers=team).json()
    assert metrics["method"] == "interpolation" and metrics["modalities"] == 3
    assert metrics["folded_tensors"] == len(report["folded"]) > 0
    assert metrics["output_bytes"] == sum(f["size"] for f in report["files"])
    assert "progress" in {e["type"] for e in client.get(f"/v1/folds/{job['id']}/events", headers=team).json()["events"]}

    # Another team, or another kind's collection, does not know the job; the dashboard lists the kind.
    assert client.get(f"/v1/folds/{job['id']}", headers=other_team).status_code == 404
    assert client.get(f"/v1/merges/{job['id']}", headers=team).status_code == 404
    assert [j["id"] for j in client.get("/v1/folds", headers=team).json()["jobs"]] == [job["id"]]
    assert '<option value="folds">Fold</option>' in client.get("/ui/jobs").text
    assert client.get(f"/ui/folds/{job['id']}").status_code == 200


@pytest.mark.parametrize("edit, field", [
    (lambda s: {**s, "method": "blend"}, "spec.method"),
    (lambda s: {**s, "model": "/nowhere/model"}, "spec.model"),
    (lambda s: {**s, "model": str(Path(s["model"]).parent / f"gone-{uuid.uuid4().hex[:6]}")}, "spec.model"),
    (lambda s: {**s, "groups": {"v": {"pattern": r"\.mlp\.v\.", "replace": "."},
                                "x": {"pattern": r"\.nothing\.", "replace": "."}}}, "spec.groups"),
    (lambda s: {**s, "method": "modality_arithmetic", "w0_model": "/nowhere/w0"}, "spec.w0_model"),
    (lambda s: {**s, "push_to_hub": {"repo_id": "org/m"}}, "spec.push_to_hub"),
])
def test_bad_fold_specs_are_refused_naming_the_field(client: TestClient, team, multiway, edit, field) -> None:  # type: ignore[no-untyped-def]
    spec: dict[str, Any] = edit({"model": str(multiway), "method": "interpolation"})
    refused = client.post("/v1/folds", json={"spec": spec}, headers=team)
    assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
    assert client.get("/v1/folds", headers=team).json()["jobs"] == []  # nothing accepted


def test_a_queued_fold_is_cancelled_by_its_team_only(queue_only_client: TestClient, team, other_team,  # type: ignore[no-untyped-def]
                                                     multiway) -> None:
    client = queue_only_client
    job = client.post("/v1/folds", json={"spec": {"model": str(multiway), "method": "interpolation"}},
                      headers=team).json()
    assert client.post(f"/v1/folds/{job['id']}:cancel", headers=other_team).status_code == 404
    cancelled = client.post(f"/v1/folds/{job['id']}:cancel", headers=team)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    assert client.get(f"/v1/folds/{job['id']}", headers=team).json()["state"] == "cancelled"
