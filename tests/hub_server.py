"""A tiny HTTP server on loopback that answers the Hugging Face Hub's upload endpoints and records
what it was sent: the real `HfApi` client talks to it, in whatever process pushes."""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

COMMIT_OID = "c" * 40


@dataclass
class HubRecord:
    """The requests a push made: repos created, model cards validated and, per commit, each file's bytes by path."""

    created: list[dict[str, Any]] = field(default_factory=list)
    commits: list[dict[str, Any]] = field(default_factory=list)
    validated_cards: list[str] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)


def _handler(record: HubRecord, endpoint: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            record.authorizations.append(self.headers.get("Authorization", ""))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:3] == ["api", "repos", "create"]:
                request = json.loads(body)
                record.created.append(request)
                repo_id = f"{request['organization']}/{request['name']}"
                return self._answer({"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})
            if parts == ["api", "validate-yaml"]:  # the model card's metadata, checked before the commit
                record.validated_cards.append(json.loads(body)["content"])
                return self._answer({"warnings": [], "errors": []})
            if len(parts) < 5:
                return self.send_error(404, f"not a hub endpoint: {self.path}")
            repo_id = "/".join(parts[2:4])
            if parts[4] == "preupload":  # every file as a regular git blob: no LFS round trip
                files = json.loads(body)["files"]
                return self._answer({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
            if parts[4] == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                summary = next(line["value"]["summary"] for line in lines if line["key"] == "header")
                record.commits.append({"repo_id": repo_id, "summary": summary, "files": files})
                return self._answer({"commitUrl": f"{endpoint[0]}/{repo_id}/commit/{COMMIT_OID}",
                                     "commitOid": COMMIT_OID, "pullRequestUrl": None})
            self.send_error(404, f"not a hub endpoint: {self.path}")

    return Handler


@contextmanager
def recording_hub() -> Iterator[tuple[str, HubRecord]]:
    """(endpoint URL, record) of a hub stand-in serving on a free loopback port until the block ends."""
    record, endpoint = HubRecord(), [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(record, endpoint))
    endpoint[0] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint[0], record
    finally:
        server.shutdown()
        server.server_close()
