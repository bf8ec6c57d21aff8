"""The HTTP contract: auth, tenant isolation, idempotency, limits, paging, downloads, probes."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import revoke_api_key
from app.main import create_app
from service_core.models import ApiKey, Job
from tests.service.service_support import merge_spec, wait_final


def test_every_route_needs_a_valid_key(client: TestClient, sessions, team) -> None:
    any_id = uuid.uuid4()
    routes = [("GET", "/v1/merges"), ("POST", "/v1/merges"), ("GET", f"/v1/merges/{any_id}"),
              ("POST", f"/v1/merges/{any_id}:cancel"), ("GET", f"/v1/merges/{any_id}/events"),
              ("GET", f"/v1/merges/{any_id}/metrics"), ("GET", f"/v1/merges/{any_id}/artifacts"),
              ("GET", f"/v1/merges/{any_id}/artifacts/config.json"), ("GET", "/v1/analyses")]
    for method, url in routes:
        for headers in ({}, {"Authorization": "Bearer pm_not-a-key"}, {"Authorization": "Basic eDp5"}):
            response = client.request(method, url, headers=headers, json={})
            assert response.status_code == 401, (method, url, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]

    assert client.get("/v1/merges", headers=team).status_code == 200
    with sessions() as session:  # a revoked key stops working
        key = session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc())).first()
        revoke_api_key(session, key.id)
        session.commit()
    assert client.get("/v1/merges", headers=team).status_code == 401


def test_keys_are_stored_hashed(sessions, team) -> None:
    key = team["Authorization"].removeprefix("Bearer ")
    with sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == hashlib.sha256(key.encode()).hexdigest())).one()
        assert key not in (row.key_sha256, row.prefix)


def test_another_teams_job_is_indistinguishable_from_a_missing_one(client, finished, other_team) -> None:
    owner, job = finished
    assert client.get(f"/v1/merges/{job['id']}", headers=owner).status_code == 200
    missing = str(uuid.uuid4())
    for method, path in [("GET", ""), ("POST", ":cancel"), ("GET", "/events"), ("GET", "/metrics"),
                         ("GET", "/artifacts"), ("GET", "/artifacts/config.json")]:
        theirs = client.request(method, f"/v1/merges/{job['id']}{path}", headers=other_team)
        nothing = client.request(method, f"/v1/merges/{missing}{path}", headers=other_team)
        assert theirs.status_code == nothing.status_code == 404, path
        assert theirs.json()["detail"].replace(job["id"], "ID") == nothing.json()["detail"].replace(missing, "ID")
        assert theirs.headers.keys() == nothing.headers.keys()
    stream = client.get(f"/v1/merges/{job['id']}/events", headers={**other_team, "Accept": "text/event-stream"})
    assert stream.status_code == 404
    # ...and a merge id is no analysis id either
    assert client.get(f"/v1/analyses/{job['id']}", headers=owner).status_code == 404
    assert all(j["id"] != job["id"] for j in client.get("/v1/merges", headers=other_team).json()["jobs"])


def test_idempotency_key_replays_the_same_job_per_team(queue_only_client, tiny, team, other_team, sessions) -> None:
    client, spec = queue_only_client, merge_spec(tiny)
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = client.post("/v1/merges", json=spec, headers={**team, **key})
    again = client.post("/v1/merges", json=spec, headers={**team, **key})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and first.headers["Location"] == again.headers["Location"]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == key["Idempotency-Key"])) == 1

    changed = client.post("/v1/merges", json={**spec, "seed": 7}, headers={**team, **key})
    assert changed.status_code == 422
    assert changed.json() == {"detail": "Idempotency-Key: already used with a different request body",
                              "field": "Idempotency-Key"}
    as_analysis = client.post("/v1/analyses", json=spec, headers={**team, **key})
    assert as_analysis.status_code == 422

    theirs = client.post("/v1/merges", json=spec, headers={**other_team, **key})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_full_team_queue_answers_429_with_retry_after(queue_only_client, tiny, team, settings) -> None:
    for _ in range(3):  # queue_only_client's queue holds 3 waiting jobs per team; nothing dispatches them
        assert queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team).status_code == 202
    refused = queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == str(settings.retry_after_seconds)
    assert refused.json()["detail"] == ("team has 3 waiting jobs, the limit is 3 (PIVOTMERGE_MAX_WAITING_JOBS_PER_TEAM); "
                                        "retry when some have started")
    # a cancelled job frees its slot
    job_id = queue_only_client.get("/v1/merges", headers=team).json()["jobs"][0]["id"]
    assert queue_only_client.post(f"/v1/merges/{job_id}:cancel", headers=team).json()["state"] == "cancelled"
    assert queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team).status_code == 202


def test_oversized_bodies_answer_413(client, team, settings) -> None:
    big = b'{"method": "linear", "models": [], "pad": "' + b"x" * settings.max_request_bytes + b'"}'
    response = client.post("/v1/merges", content=big, headers={**team, "Content-Type": "application/json"})
    assert response.status_code == 413 and "larger than the limit" in response.json()["detail"]
    chunked = client.post("/v1/merges", content=iter([big[:1000], big[1000:]]),
                          headers={**team, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413


@pytest.mark.parametrize("raw", [b"{not json", b"k\xe9gc\xf1Wf%\xa2E"])
def test_undecodable_bodies_answer_422_naming_the_body(client, team, raw) -> None:
    response = client.post("/v1/merges", content=raw, headers={**team, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"detail": "body: not valid JSON", "field": "body"}


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"method": "linear"}, "models", "Field required"),
    ({"method": "no_such_method", "models": [{"model": "x"}]}, "method", "no_such_method"),
    ({"method": "linear", "models": [{"model": "x", "weight": {"a": 1}}]}, "models.0.weight", ""),
    ({"method": "linear", "models": [{"model": "x"}], "seed": "abc"}, "seed", "integer"),
    ({"method": "linear", "models": [{"model": "/etc"}]}, "models.0.model", "/etc"),
    ({"method": "linear", "models": [{"model": "{allowed}/no-such-model"}]}, "models.0.model", "no-such-model"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"nope": 1}}]}, "models.0.parameters.nope", "nope"),
    ({"method": "linear", "models": [{"model": "x" * 5000}]}, "models.0.model", "too long"),
    ({"method": "linear", "models": [{"model": "x"}], "include": ["a\u0000"]}, "include.0", "NUL"),
])
def test_bad_specs_answer_422_naming_the_problem(client, team, settings, body, field, words) -> None:
    body = json.loads(json.dumps(body).replace("{allowed}", str(settings.allowed_roots[0])))
    response = client.post("/v1/merges", json=body, headers=team)
    assert response.status_code == 422, response.text
    error = response.json()
    assert words in error["detail"] and error["field"] == field
    if field:
        # a union's errors name the member tried too: models.0.weight.bool
        assert error["field"].startswith(field) and error["detail"].startswith(error["field"])


def test_bad_json_and_bad_query_answer_422(client, team) -> None:
    response = client.post("/v1/merges", content=b"{not json", headers={**team, "Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"
    assert client.get("/v1/merges?page_size=0", headers=team).json()["field"] == "page_size"
    assert client.get("/v1/merges?page_token=garbage", headers=team).json()["field"] == "page_token"
    assert client.get("/v1/merges?state=sleeping", headers=team).json()["field"] == "state.0"
    assert client.get("/v1/merges/not-a-uuid", headers=team).json()["field"] == "job_id"


def test_event_numbers_past_the_database_integer_answer_422(client, finished) -> None:
    owner, job = finished
    response = client.get(f"/v1/merges/{job['id']}/events", params={"after_seq": 2**31}, headers=owner)
    assert response.status_code == 422 and response.json()["field"] == "after_seq"


def test_pages_are_newest_first_and_filter_on_state(queue_only_client, tiny, team) -> None:
    client = queue_only_client
    ids = [client.post("/v1/merges", json=merge_spec(tiny, seed=i), headers=team).json()["id"] for i in range(3)]
    client.post(f"/v1/merges/{ids[1]}:cancel", headers=team)
    seen, token = [], None
    while True:
        page = client.get("/v1/merges", params={"page_size": 2, **({"page_token": token} if token else {})},
                          headers=team).json()
        seen += [j["id"] for j in page["jobs"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == ids[::-1]
    cancelled = client.get("/v1/merges", params={"state": "cancelled"}, headers=team).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    both = client.get("/v1/merges", params=[("state", "cancelled"), ("state", "waiting")], headers=team).json()["jobs"]
    assert len(both) == 3


def test_downloads_support_range_and_etag(client, finished) -> None:
    owner, job = finished
    artifact = next(a for a in client.get(f"/v1/merges/{job['id']}/artifacts", headers=owner).json()["artifacts"]
                    if a["name"].endswith(".safetensors"))
    whole = client.get(artifact["url"], headers=owner)
    etag = whole.headers["ETag"]
    assert etag == f'"{artifact["sha256"]}"' and whole.headers["Accept-Ranges"] == "bytes"

    part = client.get(artifact["url"], headers={**owner, "Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole.content[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{artifact['size']}"
    assert client.get(artifact["url"], headers={**owner, "Range": "bytes=-7"}).content == whole.content[-7:]
    assert client.get(artifact["url"], headers={**owner, "Range": "bytes=100-"}).content == whole.content[100:]
    beyond = client.get(artifact["url"], headers={**owner, "Range": f"bytes={artifact['size']}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{artifact['size']}"
    assert client.get(artifact["url"], headers={**owner, "Range": "lines=1-2"}).status_code == 200

    cached = client.get(artifact["url"], headers={**owner, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["ETag"] == etag
    assert client.get(artifact["url"], headers={**owner, "If-None-Match": '"other"'}).status_code == 200
    assert client.get(f"/v1/merges/{job['id']}/artifacts/nope.bin", headers=owner).status_code == 404


def test_metrics_and_a_finished_job_cannot_be_cancelled(client, finished) -> None:
    owner, job = finished
    metrics = client.get(f"/v1/merges/{job['id']}/metrics", headers=owner).json()
    assert metrics == {"job_id": job["id"], "state": "succeeded", "metrics": None}  # the spec asked for no evaluation
    refused = client.post(f"/v1/merges/{job['id']}:cancel", headers=owner)
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"merge {job['id']} has already succeeded; only waiting, queued or running jobs can be cancelled"


def test_analysis_is_a_job_with_distance_metrics(client, team, tiny, worker) -> None:
    created = client.post("/v1/analyses", json=merge_spec(tiny), headers=team)
    assert created.status_code == 202 and created.headers["Location"].startswith("/v1/analyses/")
    done = wait_final(client, created.headers["Location"], team)
    assert done["state"] == "succeeded" and done["kind"] == "analysis"
    metrics = client.get(f"{created.headers['Location']}/metrics", headers=team).json()["metrics"]
    assert metrics["tensors"] > 0 and metrics["total"]
    names = [a["name"] for a in client.get(f"{created.headers['Location']}/artifacts", headers=team).json()["artifacts"]]
    assert names == ["analysis_report.json"]


def test_an_analysis_of_one_model_is_refused_before_it_is_queued(client, team, tiny) -> None:
    one_model = {**merge_spec(tiny), "models": [{"model": str(tiny.experts[0])}]}
    created = client.post("/v1/analyses", json=one_model, headers=team)
    assert created.status_code == 422
    assert created.json() == {"detail": "models: analysis compares models, so it needs at least two", "field": "models"}
    assert client.get("/v1/analyses", headers=team).json()["jobs"] == []


def test_probes(client, settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    no_broker = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(no_broker)) as broken:
        response = broken.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok" and response.json()["checks"]["broker"].startswith("unreachable")


def test_archive_streams_every_artifact_as_one_tar(client, finished, queue_only_client, team, tiny) -> None:
    import io
    import tarfile

    owner, job = finished
    listing = client.get(f"/v1/merges/{job['id']}/artifacts", headers=owner).json()["artifacts"]
    archive = client.get(f"/v1/merges/{job['id']}/artifacts:archive", headers=owner)
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    assert archive.headers["Content-Disposition"] == f'attachment; filename="{job["id"]}.tar"'
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        members = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}
    assert members == {a["name"]: a["sha256"] for a in listing}

    queued = queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
    try:
        refused = queue_only_client.get(f"/v1/merges/{queued['id']}/artifacts:archive", headers=team)
        assert refused.status_code == 409 and "is waiting" in refused.json()["detail"]
    finally:
        queue_only_client.post(f"/v1/merges/{queued['id']}:cancel", headers=team)
