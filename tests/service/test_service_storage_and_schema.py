"""Migrations match the models; artifact stores keep bytes intact (S3 against a real S3 server on loopback)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from moto.server import ThreadedMotoServer
from sqlalchemy import create_engine

from app.db import migrate
from app.models import Base
from app.storage import ArtifactStore, LocalStore, S3Store, artifact_key, file_sha256


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


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"artifacts-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return S3Store(bucket, prefix="team-models/", endpoint_url=s3_endpoint)


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
