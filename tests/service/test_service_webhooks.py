"""Completion webhooks against a real HTTP receiver on loopback: signed, retried with backoff, recorded."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service_core.settings import Settings
from tests.service.service_support import WorkerProcess, merge_spec, service_env, wait_final, wait_for

BACKOFF_SECONDS = 0.3


class Receiver:
    """An HTTP server on 127.0.0.1 answering each POST with the next status of `script` (then 200)."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((time.monotonic(), dict(self.headers), body))
                status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"try again")

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def loopback_settings(settings_values) -> dict[str, str]:
    return {**settings_values, "webhook_allow_private_addresses": "true",
            "webhook_backoff_seconds": str(BACKOFF_SECONDS), "webhook_max_attempts": "4"}


@pytest.fixture(scope="module")
def webhook_worker(loopback_settings, service_dir) -> Iterator[WorkerProcess]:
    process = WorkerProcess(service_env(loopback_settings), service_dir / "webhook-worker.log", "pmtest-webhooks",
                            queues="webhooks")
    yield process
    process.stop()


@pytest.fixture
def loopback_client(loopback_settings) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(**loopback_settings))) as client:
        yield client


def test_a_delivery_that_fails_twice_is_retried_with_backoff_and_signed(loopback_client, team, tiny, worker,
                                                                        webhook_worker) -> None:
    receiver = Receiver([500, 503])
    try:
        created = loopback_client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.succeeded"]},
                                       headers=team)
        assert created.status_code == 201, created.text
        hook = created.json()
        assert hook["secret"].startswith("whsec_")
        only_failures = loopback_client.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.failed"]},
                                             headers=team).json()
        assert "secret" not in loopback_client.get("/v1/webhooks", headers=team).json()["webhooks"][0]

        job = loopback_client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
        assert wait_final(loopback_client, f"/v1/merges/{job['id']}", team)["state"] == "succeeded"

        deliveries_url = f"/v1/webhooks/{hook['id']}/deliveries"
        delivered = wait_for(lambda: [d for d in loopback_client.get(deliveries_url, headers=team).json()["deliveries"]
                                      if d["state"] != "pending"], 60, "the delivery to end", interval=0.2)
    finally:
        receiver.close()

    (delivery,) = delivered
    assert delivery["state"] == "succeeded" and delivery["attempts"] == 3
    assert delivery["last_status_code"] == 200 and delivery["last_response"] == "ok"
    assert delivery["event"] == "job.succeeded" and delivery["job_id"] == job["id"]
    assert len(receiver.received) == 3
    gaps = [b[0] - a[0] for a, b in zip(receiver.received, receiver.received[1:])]
    assert gaps[0] >= BACKOFF_SECONDS and gaps[1] >= 2 * BACKOFF_SECONDS  # exponential backoff
    for _, headers, body in receiver.received:
        timestamp, mac = dict(part.split("=", 1) for part in headers["PivotMerge-Signature"].split(","))["t"], \
            dict(part.split("=", 1) for part in headers["PivotMerge-Signature"].split(","))["v1"]
        expected = hmac.new(hook["secret"].encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(mac, expected)
        assert abs(int(timestamp) - time.time()) < 120
        payload = json.loads(body)
        assert payload["event"] == "job.succeeded" and payload["job"]["id"] == job["id"]
        assert headers["PivotMerge-Event"] == "job.succeeded" and headers["PivotMerge-Delivery"] == delivery["id"]
    # The endpoint that wants only failures got nothing for this success.
    assert loopback_client.get(f"/v1/webhooks/{only_failures['id']}/deliveries", headers=team).json() == {"deliveries": []}


def test_a_receiver_that_never_succeeds_ends_failed_after_the_attempts(loopback_client, team, tiny, worker,
                                                                      webhook_worker) -> None:
    receiver = Receiver([500] * 10)
    try:
        hook = loopback_client.post("/v1/webhooks", json={"url": receiver.url}, headers=team).json()
        job = loopback_client.post("/v1/merges", json=merge_spec(tiny), headers=team).json()
        wait_final(loopback_client, f"/v1/merges/{job['id']}", team)
        url = f"/v1/webhooks/{hook['id']}/deliveries"
        (delivery,) = wait_for(lambda: [d for d in loopback_client.get(url, headers=team).json()["deliveries"]
                                        if d["state"] == "failed"], 60, "the delivery to fail", interval=0.2)
    finally:
        receiver.close()
    assert delivery["attempts"] == 4 and delivery["last_status_code"] == 500
    assert delivery["last_error"] == "the receiver answered HTTP 500" and len(receiver.received) == 4


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://[::1]/hook",
                                 "http://169.254.169.254/latest/meta-data", "http://localhost/hook",
                                 "ftp://example.com/hook", "http://user:pw@example.com/"])
def test_private_addresses_and_other_urls_are_refused_by_default(client, team, url: str) -> None:
    response = client.post("/v1/webhooks", json={"url": url}, headers=team)
    assert response.status_code == 422 and response.json()["field"] == "url", response.text


def test_webhooks_belong_to_their_team(loopback_client, team, other_team) -> None:
    hook = loopback_client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=team).json()
    assert loopback_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=other_team).status_code == 404
    assert loopback_client.delete(f"/v1/webhooks/{hook['id']}", headers=other_team).status_code == 404
    assert loopback_client.delete(f"/v1/webhooks/{hook['id']}", headers=team).status_code == 204
    assert loopback_client.get("/v1/webhooks", headers=team).json() == {"webhooks": []}
    assert loopback_client.get(f"/v1/webhooks/{uuid.uuid4()}/deliveries", headers=team).status_code == 404
