"""Structured logs: the API's request lines and the worker's job lines are JSON objects that say which
request, job, team and attempt they are about."""

from __future__ import annotations

import io
import json
import logging
import uuid

from app.auth import create_api_key, create_team
from core.logs import JsonFormatter
from tests.service.service_support import merge_spec, wait_final


def test_api_and_worker_lines_carry_request_job_team_and_attempt(client, sessions, tiny, worker) -> None:
    with sessions() as session:
        team = create_team(session, f"logs-{uuid.uuid4().hex[:8]}")
        _, key = create_api_key(session, team)
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    api_log = logging.getLogger("pivotmerge.api")
    api_log.addHandler(handler)
    try:
        submitted = client.post("/v1/merges", json=merge_spec(tiny), headers={**headers, "X-Request-ID": "req-logs-1"})
        job_id = submitted.json()["id"]
        assert wait_final(client, f"/v1/merges/{job_id}", headers)["state"] == "succeeded"
        refused = client.get(f"/v1/merges/{job_id}", headers={"Authorization": "Bearer pm_nobody"})
    finally:
        api_log.removeHandler(handler)
    assert submitted.headers["X-Request-ID"] == "req-logs-1"
    assert refused.status_code == 401 and len(refused.headers["X-Request-ID"]) == 32  # one of ours
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    submit = next(line for line in lines if line["request_id"] == "req-logs-1")
    assert (submit["message"], submit["status"], submit["job_id"], submit["team"]) == (
        "POST /v1/merges 202", 202, job_id, str(team.id))
    polls = [line for line in lines if line["message"] == f"GET /v1/merges/{job_id} 200"]
    assert polls and all(line["team"] == str(team.id) and line["job_id"] == job_id for line in polls)
    unknown = next(line for line in lines if line["request_id"] == refused.headers["X-Request-ID"])
    assert unknown["status"] == 401 and "team" not in unknown  # no key, no team

    worker_lines = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    about_the_job = [line for line in worker_lines if line.get("job_id") == job_id]
    assert {line["message"] for line in about_the_job} >= {f"delivery of job {job_id}: attempt 1",
                                                          f"attempt 1 of job {job_id} ended with success"}
    assert all(line["team"] == str(team.id) and line["attempt"] == 1 for line in about_the_job)
