"""Labels filter the job list; DELETE removes a finished job's artifacts; retention expires old ones."""

from __future__ import annotations

import uuid
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.main import create_app
from service_core.models import Artifact, Job, utcnow
from tests.service.service_support import merge_spec, wait_final, wait_for


def test_labels_are_kept_and_filter_the_list(queue_only_client, team, tiny) -> None:
    created = {}
    for labels in (["project=vision", "stage=dev"], ["project=vision", "stage=prod"], ["project=audio"]):
        response = queue_only_client.post("/v1/merges", params={"label": labels}, json=merge_spec(tiny), headers=team)
        assert response.status_code == 202, response.text
        created[tuple(labels)] = response.json()
        assert response.json()["labels"] == dict(label.split("=") for label in labels)
    try:
        def listed(*labels: str) -> set[str]:
            page = queue_only_client.get("/v1/merges", params={"label": list(labels)}, headers=team).json()
            return {job["id"] for job in page["jobs"]}

        vision_dev, vision_prod, audio = (job["id"] for job in created.values())
        assert listed("project=vision") == {vision_dev, vision_prod}
        assert listed("project=vision", "stage=prod") == {vision_prod}
        assert listed("project=audio") == {audio}
        assert listed("project=nothing") == set()
        assert queue_only_client.get(f"/v1/merges/{audio}", headers=team).json()["labels"] == {"project": "audio"}
    finally:
        for job in created.values():
            queue_only_client.post(f"/v1/merges/{job['id']}:cancel", headers=team)


def test_bad_labels_are_422_naming_label(queue_only_client, team, tiny) -> None:
    for bad in ["novalue", "Upper=x", "=x", "k=white space", "k=" + "v" * 64, "é=1"]:
        response = queue_only_client.post("/v1/merges", params={"label": [bad]}, json=merge_spec(tiny), headers=team)
        assert response.status_code == 422 and response.json()["field"] == "label", (bad, response.text)
        listing = queue_only_client.get("/v1/merges", params={"label": [bad]}, headers=team)
        assert listing.status_code == 422 and listing.json()["field"] == "label"
    too_many = [f"k{i}=v" for i in range(17)]
    response = queue_only_client.post("/v1/merges", params={"label": too_many}, json=merge_spec(tiny), headers=team)
    assert response.status_code == 422 and "at most 16" in response.json()["detail"]


def _succeeded(client, team, tiny) -> dict:  # type: ignore[no-untyped-def]
    job = client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
    done = wait_final(client, f"/v1/merges/{job['id']}", team)
    assert done["state"] == "succeeded"
    return done


def test_delete_removes_a_finished_jobs_artifacts_and_keeps_its_record(client, team, tiny, worker, settings,
                                                                      sessions) -> None:
    job = _succeeded(client, team, tiny)
    url = f"/v1/merges/{job['id']}"
    artifact = client.get(f"{url}/artifacts", headers=team).json()["artifacts"][0]
    assert (settings.storage_dir / "jobs" / job["id"]).is_dir()

    deleted = client.delete(url, headers=team)
    assert deleted.status_code == 200 and deleted.json()["deleted_at"] is not None
    assert deleted.json()["state"] == "succeeded"
    assert client.get(f"{url}/artifacts", headers=team).json() == {"artifacts": []}
    assert client.get(artifact["url"], headers=team).status_code == 404
    assert not (settings.storage_dir / "jobs" / job["id"]).exists()
    with sessions() as session:
        assert session.scalars(select(Artifact).where(Artifact.job_id == uuid.UUID(job["id"]))).all() == []
    events = client.get(f"{url}/events", headers=team).json()["events"]
    assert events[-1]["type"] == "deleted"
    again = client.delete(url, headers=team)
    assert again.status_code == 200 and again.json()["deleted_at"] == deleted.json()["deleted_at"]
    assert len(client.get(f"{url}/events", headers=team).json()["events"]) == len(events)


def test_delete_of_an_unfinished_job_is_409_naming_its_state(queue_only_client, team, tiny) -> None:
    job = queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
    try:
        refused = queue_only_client.delete(f"/v1/merges/{job['id']}", headers=team)
        assert refused.status_code == 409 and f"merge {job['id']} is waiting" in refused.json()["detail"]
    finally:
        queue_only_client.post(f"/v1/merges/{job['id']}:cancel", headers=team)


def test_retention_expires_old_artifacts_from_the_api_process(client, team, tiny, worker, settings, sessions) -> None:
    old, recent = _succeeded(client, team, tiny), _succeeded(client, team, tiny)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == uuid.UUID(old["id"])).values(finished_at=utcnow() - timedelta(days=8)))
        session.commit()
    expiring = settings.model_copy(update={"artifact_retention_days": 7, "retention_check_seconds": 0.2})
    with TestClient(create_app(expiring)) as api:  # its housekeeping thread runs the retention pass
        gone = wait_for(lambda: api.get(f"/v1/merges/{old['id']}", headers=team).json()["deleted_at"], 30,
                        "the old job's artifacts to expire", interval=0.2)
    assert gone
    assert client.get(f"/v1/merges/{old['id']}/artifacts", headers=team).json() == {"artifacts": []}
    assert not (settings.storage_dir / "jobs" / old["id"]).exists()
    event = client.get(f"/v1/merges/{old['id']}/events", headers=team).json()["events"][-1]
    assert event["type"] == "expired" and "7 days" in event["data"]["reason"]
    kept = client.get(f"/v1/merges/{recent['id']}", headers=team).json()
    assert kept["deleted_at"] is None and client.get(f"/v1/merges/{recent['id']}/artifacts", headers=team).json()["artifacts"]
