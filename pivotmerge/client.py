"""A small Python client of the merge service's HTTP API.

    from pivotmerge.client import Client
    client = Client()                       # PIVOTMERGE_URL, PIVOTMERGE_API_KEY
    job = client.submit(spec)               # a dict: the YAML spec's content
    for event in client.follow(job["id"]):  # the SSE stream, resumed if the connection drops
        ...
    client.download(job["id"], "merged/")   # resumes partial files with Range, checks sha256

It speaks HTTP only (httpx); it imports nothing of the service.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("succeeded", "failed", "cancelled")
CHUNK = 1 << 20


class ClientError(Exception):
    """The service refused a request (or could not be reached); the message is its one-line `detail`."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field = status, detail, field


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, *, http: httpx.Client | None = None,
                 timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("PIVOTMERGE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("PIVOTMERGE_API_KEY")
        if not key:
            raise ClientError(0, "no API key: set PIVOTMERGE_API_KEY (or pass api_key)")
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http = http or httpx.Client(timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, self.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                                         **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(0, f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise refusal(response)
        return response

    def submit(self, spec: dict[str, Any], *, labels: dict[str, str] | None = None, idempotency_key: str | None = None,
               kind: str = "merges", priority: int = 0) -> dict[str, Any]:
        """Submit a job; `priority` orders it among the team's own waiting jobs (higher first)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params: dict[str, Any] = {"label": [f"{k}={v}" for k, v in (labels or {}).items()], "priority": priority}
        return self._request("POST", f"/v1/{kind}", json=spec, params=params, headers=headers).json()

    def get(self, job_id: str, *, kind: str = "merges") -> dict[str, Any]:
        return self._request("GET", f"/v1/{kind}/{job_id}").json()

    def metrics(self, job_id: str, *, kind: str = "merges") -> dict[str, Any] | None:
        """The job's metrics (a merge's evaluation); None until it has succeeded or when nothing was measured."""
        metrics: dict[str, Any] | None = self._request("GET", f"/v1/{kind}/{job_id}/metrics").json()["metrics"]
        return metrics

    def ready(self) -> bool:
        """The service answers and its database and broker are reachable (GET /readyz)."""
        try:
            return self.http.get(self.url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def jobs(self, *, states: list[str] | None = None, labels: dict[str, str] | None = None,
             kind: str = "merges") -> Iterator[dict[str, Any]]:
        """Every job of the team, newest first, following the page tokens."""
        params: dict[str, Any] = {"page_size": 100, "state": states or [],
                                  "label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        while True:
            page = self._request("GET", f"/v1/{kind}", params=params).json()
            yield from page["jobs"]
            if not page.get("next_page_token"):
                return
            params["page_token"] = page["next_page_token"]

    def cancel(self, job_id: str, *, kind: str = "merges") -> dict[str, Any]:
        return self._request("POST", f"/v1/{kind}/{job_id}:cancel").json()

    def follow(self, job_id: str, *, kind: str = "merges") -> Iterator[dict[str, Any]]:
        """The job's events as they happen, until it ends; a dropped stream resumes after the last event seen."""
        last = 0
        while True:
            headers = {**self.headers, "Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                with self.http.stream("GET", f"{self.url}/v1/{kind}/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=None)) as stream:
                    if stream.status_code >= 400:
                        stream.read()
                        raise refusal(stream)
                    for event in parse_sse(stream.iter_lines()):
                        last = event["seq"]
                        yield event
            except httpx.TransportError:
                continue  # the connection dropped: resume after `last`
            if self.get(job_id, kind=kind)["state"] in FINAL_STATES:
                return

    def download(self, job_id: str, out_dir: str | Path, *, kind: str = "merges") -> list[Path]:
        """Every artifact into `out_dir`; a partial file is resumed with Range; each file's sha256 is checked."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for artifact in self._request("GET", f"/v1/{kind}/{job_id}/artifacts").json()["artifacts"]:
            path = out / artifact["name"]
            have = path.stat().st_size if path.is_file() else 0
            if have > artifact["size"] or (have == artifact["size"] and file_sha256(path) != artifact["sha256"]):
                path.unlink()  # not a prefix of this artifact
                have = 0
            if have < artifact["size"]:
                headers = {**self.headers, "Range": f"bytes={have}-"} if have else self.headers
                # S3 artifacts answer 307 to a presigned URL; httpx drops Authorization on that other host.
                with self.http.stream("GET", self.url + artifact["url"], headers=headers, follow_redirects=True) as stream:
                    if stream.status_code not in (200, 206):
                        stream.read()
                        raise ClientError(stream.status_code, f"{artifact['name']}: HTTP {stream.status_code}")
                    with path.open("ab" if stream.status_code == 206 else "wb") as f:
                        for chunk in stream.iter_bytes(CHUNK):
                            f.write(chunk)
            if file_sha256(path) != artifact["sha256"]:
                raise ClientError(0, f"{artifact['name']}: sha256 differs from the service's record; download again")
            written.append(path)
        return written


def refusal(response: httpx.Response) -> ClientError:
    """The service's one-line error for a 4xx/5xx answer."""
    try:
        body = response.json()
        return ClientError(response.status_code, str(body["detail"]), body.get("field"))
    except (ValueError, KeyError, TypeError):  # not the API's JSON error: a proxy, say
        return ClientError(response.status_code, f"HTTP {response.status_code}: {response.text[:200]}")


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events as the API's event objects (`seq`, `type`, `data`, `created_at`)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
