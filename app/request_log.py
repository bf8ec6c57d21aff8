"""One structured log line per API request, and a request id that every line logged meanwhile carries.

The id is the caller's `X-Request-ID` when it is a plain token (up to 64 of `A-Z a-z 0-9 . _ -`), else a
new one; the response carries it back. The line names the team (once its key is checked) and the job
(the path's, or the one a submission created).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from core.logs import request_id

log = logging.getLogger("pivotmerge.api")
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
JOB_IN_LOCATION = re.compile(r"^/v1/\w+/([0-9a-f-]{36})$")


class RequestLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        response: dict[str, Any] = {"status": 500}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = dict(message.get("headers", []))
                response["location"] = headers.get(b"location", b"").decode("latin-1")
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            created = JOB_IN_LOCATION.match(response.get("location", ""))
            job = scope.get("path_params", {}).get("job_id") or (created.group(1) if created else None)
            log.info("%s %s %s", scope["method"], scope["path"], response["status"], extra={
                "status": response["status"], "ms": round((time.perf_counter() - started) * 1000, 1),
                **({"team": scope["state"]["team"]} if "team" in scope.get("state", {}) else {}),
                **({"job_id": str(job)} if job else {})})
            request_id.reset(token)
