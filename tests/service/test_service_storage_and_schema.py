"""Migrations match the models; artifact stores keep bytes intact (S3 against a real S3 server on loopback)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from moto.server import ThreadedMotoServer
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.auth import hash_key
from core.db import migrate
from app.main import create_app
from core.models import ApiKey, Artifact, Base, Job, JobState
from core.storage import ArtifactStore, LocalStore, S3Store, artifact_key, file_sha256, make_store


def test_migrations_produce_exactly_the_models(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert drift == []


def test_migrations_run_on_sqlite_from_empty(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    migrate(url)
    migrate(url)  # a second run is a no-op
    engine = create_engine(url)
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert drift == []


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback S3 server, with credentials in the environment as boto3 expects."""
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"artifacts-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, s3_endpoint: str) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_bucket"), prefix="team-models/", endpoint_url=s3_endpoint)


def test_store_round_trip_ranges_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 9000  # > 2 MiB: several read chunks
    src = tmp_path / "model.safetensors"
    src.write_bytes(payload)
    digest = file_sha256(src)
    assert digest == hashlib.sha256(payload).hexdigest()

    job = uuid.uuid4()
    key = artifact_key(job, "model.safetensors")
    store.put(key, src)
    assert hashlib.sha256(b"".join(store.read(key, 0, len(payload)))).hexdigest() == digest
    assert b"".join(store.read(key, 1000, 1010)) == payload[1000:1010]
    assert b"".join(store.read(key, len(payload) - 3, len(payload))) == payload[-3:]

    store.delete_prefix(artifact_key(job, ""))
    with pytest.raises((FileNotFoundError, ClientError)):  # local, S3
        b"".join(store.read(key, 0, 1))


def test_local_store_refuses_keys_that_escape_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="escapes"):
        list(LocalStore(tmp_path / "store").read("../../etc/passwd", 0, 10))


def test_api_serves_artifacts_from_s3(settings, sessions, team, s3_endpoint, s3_bucket, tmp_path) -> None:
    s3_settings = settings.model_copy(update={"storage": "s3", "s3_bucket": s3_bucket, "s3_endpoint_url": s3_endpoint,
                                              "housekeeping": False})
    store = make_store(s3_settings)

    payload = uuid.uuid4().bytes * 5000
    with sessions() as session:  # a finished job whose worker stored its file in S3
        team_id = session.scalar(select(ApiKey.team_id).where(ApiKey.key_sha256 == hash_key(team["Authorization"][7:])))
        job = Job(team_id=team_id, kind="merge", state=JobState.succeeded, spec={}, request_sha256="0" * 64)
        session.add(job)
        session.flush()
        key = artifact_key(job.id, "model.safetensors")
        (tmp_path / "f").write_bytes(payload)
        store.put(key, tmp_path / "f")
        session.add(Artifact(job_id=job.id, name="model.safetensors", size=len(payload),
                             sha256=hashlib.sha256(payload).hexdigest(), storage_key=key))
        session.commit()

    with TestClient(create_app(s3_settings), follow_redirects=False) as client:
        url = f"/v1/merges/{job.id}/artifacts/model.safetensors"
        # The API answers with a presigned URL of the S3 server instead of streaming the bytes itself.
        redirect = client.get(url, headers=team)
        assert redirect.status_code == 307 and redirect.content == b""
        assert redirect.headers["ETag"] == f'"{hashlib.sha256(payload).hexdigest()}"'
        presigned = redirect.headers["Location"]
        assert presigned.startswith(f"{s3_endpoint}/{s3_bucket}/") and "Signature" in presigned
        whole = httpx.get(presigned)
        assert whole.status_code == 200 and whole.content == payload
        # S3 answers with this Content-Disposition (the signed parameter; moto does not apply it).
        assert "response-content-disposition=attachment%3B%20filename%3D%22model.safetensors%22" in presigned
        part = httpx.get(presigned, headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == payload[100:200]
        unchanged = client.get(url, headers={**team, "If-None-Match": redirect.headers["ETag"]})
        assert unchanged.status_code == 304
        archive = client.get(f"/v1/merges/{job.id}/artifacts:archive", headers=team)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert tar.getnames() == ["model.safetensors"]
        assert tar.extractfile("model.safetensors").read() == payload


def test_non_finite_metrics_are_stored_as_null_and_served(settings, sessions, team) -> None:
    """A metric over no tokens is NaN and a perplexity can overflow: Postgres refuses both in JSON."""
    metrics = {"merged": [{"dataset": "empty", "samples": 2, "tokens": 0, "caption_loss": float("nan"),
                           "perplexity": float("inf"), "token_accuracy": float("nan")}]}
    with sessions() as session:
        team_id = session.scalar(select(ApiKey.team_id).where(ApiKey.key_sha256 == hash_key(team["Authorization"][7:])))
        job = Job(team_id=team_id, kind="merge", state=JobState.succeeded, spec={}, request_sha256="1" * 64,
                  report={"evaluation": metrics, "total_s": float("-inf")}, metrics=metrics)
        session.add(job)
        session.commit()
    with sessions() as session:
        stored = session.get(Job, job.id)
        assert stored.report["total_s"] is None
        assert stored.metrics["merged"][0] == {"dataset": "empty", "samples": 2, "tokens": 0, "caption_loss": None,
                                               "perplexity": None, "token_accuracy": None}
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/merges/{job.id}/metrics", headers=team)
    assert response.status_code == 200
    assert response.json()["metrics"]["merged"][0]["caption_loss"] is None
