"""Hub settings of the service: push_to_hub with the service's token, through a real worker process
to a hub stand-in on loopback (no hub is reachable here); downloads off unless the setting allows them."""

from __future__ import annotations

import hashlib
import uuid
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core.settings import Settings
from tests.hub_server import COMMIT_OID, HubRecord, recording_hub
from tests.service.service_support import WorkerProcess, merge_spec, service_env, wait_final

TOKEN = "hf_service_token"


@pytest.fixture(scope="module")
def hub() -> Iterator[tuple[str, HubRecord]]:
    with recording_hub() as served:
        yield served


@pytest.fixture(scope="module")
def hub_settings(settings_values, hub) -> dict[str, str]:  # type: ignore[no-untyped-def]
    # A key prefix of its own: only this module's worker, which has the token, runs these jobs.
    return {**settings_values, "broker_key_prefix": f"{settings_values['broker_key_prefix']}hub-{uuid.uuid4().hex[:6]}:",
            "hub_token": TOKEN, "hub_endpoint": hub[0], "housekeeping": "false"}


@pytest.fixture(scope="module")
def hub_worker(hub_settings, service_dir) -> Iterator[WorkerProcess]:  # type: ignore[no-untyped-def]
    process = WorkerProcess(service_env(hub_settings), service_dir / "hub-worker.log", "pmtest-hub")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def hub_client(hub_settings) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(Settings(**hub_settings))) as client:
        yield client


def test_a_job_pushes_its_merge_with_the_services_token(hub_client, hub_worker, hub, team, tiny) -> None:  # type: ignore[no-untyped-def]
    endpoint, record = hub
    spec = merge_spec(tiny, push_to_hub={"repo_id": "org/merged", "private": True})
    job = hub_client.post("/v1/merges", json=spec, headers=team).json()
    done = wait_final(hub_client, f"/v1/merges/{job['id']}", team)
    assert done["state"] == "succeeded", done.get("error")
    pushed = [e["data"] for e in hub_client.get(f"/v1/merges/{job['id']}/events", headers=team).json()["events"]
              if e["type"] == "pushed"]
    assert pushed == [{"repo_id": "org/merged", "commit": COMMIT_OID, "url": f"{endpoint}/org/merged/commit/{COMMIT_OID}"}]
    assert record.created == [{"name": "merged", "organization": "org", "visibility": "private"}]
    assert set(record.authorizations) == {f"Bearer {TOKEN}"}
    [commit] = record.commits
    assert commit["repo_id"] == "org/merged" and commit["summary"] == "Upload a model merged with PivotMerge"
    artifacts = hub_client.get(f"/v1/merges/{job['id']}/artifacts", headers=team).json()["artifacts"]
    # The hub got exactly the files the job published, byte for byte.
    assert {name: hashlib.sha256(data).hexdigest() for name, data in commit["files"].items()} == \
        {a["name"]: a["sha256"] for a in artifacts}
    assert {"model.safetensors", "merge_report.json", "README.md"} <= set(commit["files"])
    assert record.validated_cards == [commit["files"]["README.md"].decode()]


def test_push_to_hub_without_a_service_token_is_422_naming_the_field(client, team, tiny) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/merges", json=merge_spec(tiny, push_to_hub={"repo_id": "org/merged"}), headers=team)
    assert response.status_code == 422
    assert response.json() == {"detail": "push_to_hub: this service has no hub token (PIVOTMERGE_HUB_TOKEN), so it "
                                          "cannot push", "field": "push_to_hub"}


def test_an_analysis_cannot_push(hub_client, team, tiny) -> None:  # type: ignore[no-untyped-def]
    response = hub_client.post("/v1/analyses", json=merge_spec(tiny, push_to_hub={"repo_id": "org/merged"}), headers=team)
    assert response.status_code == 422 and response.json()["field"] == "push_to_hub"


def test_a_hub_id_not_cached_is_422_while_downloads_are_off(client, team, tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = merge_spec(tiny)
    spec["models"][0] = {"model": "org/not-cached"}
    response = client.post("/v1/merges", json=spec, headers=team)
    assert response.status_code == 422 and response.json()["field"] == "models.0.model"
    assert "org/not-cached: not in the Hugging Face cache" in response.json()["detail"]
    assert "downloads are off" in response.json()["detail"]
