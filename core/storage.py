"""Artifact stores: where merged models live once a job has succeeded.

Keys look like ``jobs/<job id>/<file name>``. The local store suits one host (the
embedded mode); the S3 store lets API and workers on different hosts share files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Protocol

# The digest recorded with each artifact is the one the client checks a download against: one function.
from pivotmerge.client import file_sha256  # noqa: F401  (imported by the workers and tests from here)

from core.settings import Settings

CHUNK = 1 << 20


class ArtifactStore(Protocol):
    def put(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`; the store may move the file."""

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes start..end-1 of the object, in chunks."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object whose key starts with `prefix`."""

    def download_url(self, key: str, filename: str) -> str | None:
        """A URL the client fetches the object from directly (Range included), or None: the API streams it."""


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"artifact key escapes the store: {key!r}")
        return path

    def put(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)  # a rename when on the same filesystem: no copy of a large model

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        with self._path(key).open("rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                remaining -= len(chunk)
                yield chunk

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def download_url(self, key: str, filename: str) -> str | None:
        return None  # only the API can read the folder


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 url_seconds: int = 3600) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix
        self.url_seconds = url_seconds
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def put(self, key: str, path: Path) -> None:
        # upload_file switches to multipart for large shards on its own.
        self.client.upload_file(str(path), self.bucket, self.prefix + key)

    def read(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={start}-{end - 1}")["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def download_url(self, key: str, filename: str) -> str | None:
        # Presigned: the client downloads from S3 itself, so the API never streams gigabytes.
        return self.client.generate_presigned_url("get_object", ExpiresIn=self.url_seconds, Params={
            "Bucket": self.bucket, "Key": self.prefix + key,
            "ResponseContentDisposition": f'attachment; filename="{filename}"'})

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def make_store(settings: Settings) -> ArtifactStore:
    if settings.storage == "s3":
        return S3Store(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region,
                       settings.s3_url_seconds)
    assert settings.storage_dir is not None
    return LocalStore(settings.storage_dir)


def artifact_key(job_id: object, name: str) -> str:
    return f"jobs/{job_id}/{name}"
