"""Tuning jobs against real Postgres, Redis and Celery workers: a job worker runs each study and two
trial workers run its trials. The study chooses what one process running the engine's study chooses
with the same seed, and writes the same merge; cancel stops it; a failing trial is recorded and the
job goes on; the time budget ends it; bad input is refused naming the field. (A study that runs its
trials in the job's own process, the embedded default, is the dashboard test's, tests/ui.)
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from service_core.models import Job, Trial
from service_core.tuning_request import TuningRequest
from pivotmerge.data.example import SIZES, ExampleSet, make_dataset
from pivotmerge.tune.tuning import tune
from tests.service.conftest import _new_team
from tests.service.service_support import WorkerProcess, merge_spec, service_env, wait_final, wait_for

LEASE_SECONDS = 4  # the fanned-out study's lease: its waits for trials outlast it, so it must be renewed
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def data(settings) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Three small domains under the allowed root: two to choose on, one to test the choice."""
    root = settings.allowed_roots[0] / "tune-data"
    return {d: make_dataset(root / d, d, 6, image_size=SIZES["tiny"].image_size) for d in ("shapes", "dots", "stripes")}


def tuning(tiny: ExampleSet, data: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"spec": merge_spec(tiny, components=["projector"]), "objective": "loss",
            "dev": [{"dataset": str(data["shapes"])}, {"dataset": str(data["dots"])}], **extra}


def trial_rows(sessions, job_id: str) -> list[Trial]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(Trial).where(Trial.job_id == uuid.UUID(job_id)).order_by(Trial.number)))


@pytest.fixture(scope="module")
def fanout(settings, settings_values, broker_prefix, service_dir) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """An API and three worker processes on a broker prefix of their own: one runs tuning jobs (sending
    their trials to the `trials` queue), two run trials."""
    prefix = f"{broker_prefix.rstrip(':')}-fanout:"
    env = service_env({**settings_values, "broker_key_prefix": prefix, "trial_queue": "trials",
                       "job_lease_seconds": str(LEASE_SECONDS)})
    env["OMP_NUM_THREADS"] = "1"  # tiny models: three processes on a few shared cores run fastest single-threaded
    roles = [("study", "gpu"), ("trials-a", "trials"), ("trials-b", "trials")]
    with ThreadPoolExecutor(len(roles)) as pool:  # they import the engine at once, not one after the other
        starting = [pool.submit(WorkerProcess, env, service_dir / f"{name}.log", f"pmtest-{name}-{uuid.uuid4().hex[:6]}",
                                queue) for name, queue in roles]
    workers = [f.result() for f in starting if f.exception() is None]
    try:
        assert len(workers) == len(roles), [str(f.exception()) for f in starting if f.exception()]
        api = settings.model_copy(update={"broker_key_prefix": prefix, "job_lease_seconds": LEASE_SECONDS,
                                          "lease_check_seconds": 0.5})
        with TestClient(create_app(api)) as client:
            yield client
    finally:
        with ThreadPoolExecutor(len(roles)) as pool:
            list(pool.map(WorkerProcess.stop, workers))


def test_a_study_fanned_out_to_two_workers_chooses_and_writes_what_one_process_does(
        fanout, team, tiny, data, sessions, settings, tmp_path) -> None:
    request = tuning(tiny, data, methods=["task_arithmetic", "ties"], trials=6, batch_size=2, seed=3,
                     test=[{"dataset": str(data["stripes"])}])
    created = fanout.post("/v1/tunings", json=request, headers=team)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.headers["Location"] == f"/v1/tunings/{job_id}"

    # Meanwhile, one process: the engine's own study with the same seed and batches, and its merge.
    accepted = TuningRequest.model_validate(created.json()["spec"])
    assert accepted.methods == ["task_arithmetic", "ties"] and accepted.seed == 3
    local = tune(accepted.spec, {"space": accepted.space}, accepted.dev, tmp_path / "local", methods=accepted.methods,
                 trials=accepted.trials, objective=accepted.objective, test=accepted.test, seed=accepted.seed,
                 batch_size=accepted.batch_size, allowed_roots=settings.allowed_roots).study
    assert local is not None

    done = wait_final(fanout, f"/v1/tunings/{job_id}", team, JOB_TIMEOUT)
    assert done["state"] == "succeeded", done
    assert done["kind"] == "tuning" and done["progress"]["fraction"] == 1.0

    # Every trial is a row; the two trial workers ran them, not the job's worker.
    rows = trial_rows(sessions, job_id)
    assert [r.number for r in rows] == list(range(6))
    ran = {r.worker for r in rows if r.state != "repeat"}
    with sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
    assert len(ran) == 2 and job.worker not in ran, (ran, job.worker)

    # The same trials, choice and merge as the one process.
    assert [(r.label, r.method, r.params, r.state) for r in rows] == [(t.label, t.method, t.params, t.state)
                                                                      for t in local.trials]
    assert [r.objective for r in rows] == pytest.approx([t.objective for t in local.trials], rel=1e-5)
    listed = fanout.get(f"/v1/tunings/{job_id}/trials", headers=team).json()
    assert listed["best"] == local.best and listed["budget"] == 6 and listed["direction"] == "minimize"
    assert [t["objective"] for t in listed["trials"]] == [r.objective for r in rows]

    # The artifacts are the chosen trial's merge with the study in its report; the metrics its dev and test scores.
    artifacts = {a["name"]: a for a in fanout.get(f"/v1/tunings/{job_id}/artifacts", headers=team).json()["artifacts"]}
    assert {"model.safetensors", "merge_report.json", "study.png"} <= set(artifacts)
    assert artifacts["model.safetensors"]["sha256"] == hashlib.sha256(
        (tmp_path / "local" / "model.safetensors").read_bytes()).hexdigest()
    report = fanout.get(artifacts["merge_report.json"]["url"], headers=team).json()
    assert report["study"]["best"] == local.best and len(report["study"]["trials"]) == 6
    metrics = fanout.get(f"/v1/tunings/{job_id}/metrics", headers=team).json()["metrics"]
    chosen = local.best_trial()
    assert [m["caption_loss"] for m in metrics["dev"]] == pytest.approx([m.caption_loss for m in chosen.dev], rel=1e-5)
    assert [m["dataset"] for m in metrics["test"]] == ["stripes"]
    assert metrics["test"][0]["caption_loss"] == pytest.approx(local.best_test[0].caption_loss, rel=1e-5)

    # The lease was kept while the study waited on its trials; each trial told moved the progress.
    events = fanout.get(f"/v1/tunings/{job_id}/events", headers=team).json()["events"]
    assert done["attempts"] == 1 and not [e for e in events if e["type"] == "lease"]
    assert [e["data"]["done"] for e in events if e["type"] == "trial"] == list(range(1, 7))


def test_cancel_mid_study_stops_the_remaining_trials(fanout, team, tiny, data, sessions) -> None:
    request = tuning(tiny, data, space={"task_arithmetic": {}}, trials=500, batch_size=2)
    job_id = fanout.post("/v1/tunings", json=request, headers=team).json()["id"]

    def running_past_the_lease() -> bool:
        job = fanout.get(f"/v1/tunings/{job_id}", headers=team).json()
        started = job["started_at"] and time.time() - datetime.fromisoformat(job["started_at"]).timestamp() > LEASE_SECONDS + 1
        return bool(started) and len(trial_rows(sessions, job_id)) >= 3

    wait_for(running_past_the_lease, JOB_TIMEOUT, "the study to run a few trials, for longer than its lease", 0.2)
    cancelling = fanout.post(f"/v1/tunings/{job_id}:cancel", headers=team)
    assert cancelling.status_code == 200 and cancelling.json()["state"] == "cancelling"
    done = wait_final(fanout, f"/v1/tunings/{job_id}", team, JOB_TIMEOUT)
    assert done["state"] == "cancelled" and done["attempts"] == 1
    recorded = len(trial_rows(sessions, job_id))
    time.sleep(2)  # trials queued or in flight at the cancel would have ended by now: they record nothing
    assert len(trial_rows(sessions, job_id)) == recorded < 500
    assert fanout.get(f"/v1/tunings/{job_id}/artifacts", headers=team).json() == {"artifacts": []}
    events = fanout.get(f"/v1/tunings/{job_id}/events", headers=team).json()["events"]
    assert [e["data"]["state"] for e in events if e["type"] == "state"] == ["waiting", "queued", "running", "cancelling", "cancelled"]


@pytest.fixture(scope="module")
def with_failure(fanout, tiny, data, sessions) -> tuple[dict[str, str], str]:  # type: ignore[no-untyped-def]
    """A team's tuning whose second setting breaks the model (its merged projector overflows)."""
    headers = _new_team(sessions, "tuner")
    request = tuning(tiny, data, space={"task_arithmetic": {"scale": [1.0, 1e38]}}, trials=5)
    job_id = fanout.post("/v1/tunings", json=request, headers=headers).json()["id"]
    assert wait_final(fanout, f"/v1/tunings/{job_id}", headers, JOB_TIMEOUT)["state"] == "succeeded"
    return headers, job_id


def test_a_failing_trial_is_recorded_and_the_job_succeeds(fanout, with_failure, sessions) -> None:
    client = fanout
    headers, job_id = with_failure
    rows = trial_rows(sessions, job_id)
    # A grid of two settings; a trial worker recorded the failure.
    assert [r.state for r in rows] == ["complete", "failed"]
    assert [float(r.params["scale"]) for r in rows] == [1.0, 1e38]  # JSONB keeps 1e+38 as the integer it is
    failed = rows[1]
    assert failed.error == "objective loss is NaN on the dev sets" and failed.objective is None
    assert failed.dev[0]["caption_loss"] is None  # JSON columns hold null for NaN (service_core.db)
    assert failed.worker is not None and failed.worker.startswith("pmtest-trials-")

    listed = client.get(f"/v1/tunings/{job_id}/trials", headers=headers).json()
    assert listed["best"] == 0 and [t["state"] for t in listed["trials"]] == ["complete", "failed"]
    assert listed["trials"][1]["error"] == failed.error and listed["trials"][1]["objective"] is None
    metrics = client.get(f"/v1/tunings/{job_id}/metrics", headers=headers).json()["metrics"]
    assert metrics == {"dev": rows[0].dev, "test": []}
    # The event stream carries a trial event each, and ends with the job.
    sse = {**headers, "Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/tunings/{job_id}/events", headers=sse) as stream:
        body = "".join(stream.iter_text())
    assert body.count("event: trial\n") == 2 and '"state":"succeeded"' in body.replace(" ", "")


def test_trials_and_jobs_are_the_teams_own(fanout, queue_only_client, with_failure, other_team, tiny) -> None:
    client = fanout
    headers, job_id = with_failure
    for path in (f"/v1/tunings/{job_id}", f"/v1/tunings/{job_id}/trials", f"/v1/tunings/{job_id}/metrics"):
        hidden = client.get(path, headers=other_team)
        assert hidden.status_code == 404 and hidden.json()["detail"] == f"tuning {job_id} not found"
    assert job_id not in {j["id"] for j in client.get("/v1/tunings", headers=other_team).json()["jobs"]}
    assert job_id in {j["id"] for j in client.get("/v1/tunings", headers=headers).json()["jobs"]}
    merge = queue_only_client.post("/v1/merges", json=merge_spec(tiny), headers=headers).json()
    assert client.get(f"/v1/tunings/{merge['id']}/trials", headers=headers).status_code == 404  # not a tuning
    queue_only_client.post(f"/v1/merges/{merge['id']}:cancel", headers=headers)


def test_the_time_budget_ends_the_study(fanout, team, tiny, data, sessions) -> None:
    client = fanout
    request = tuning(tiny, data, space={"task_arithmetic": {}}, trials=1000, batch_size=2, timeout_s=0.5)
    job_id = client.post("/v1/tunings", json=request, headers=team).json()["id"]
    assert wait_final(client, f"/v1/tunings/{job_id}", team, JOB_TIMEOUT)["state"] == "succeeded"
    report = client.get(f"/v1/tunings/{job_id}/artifacts/merge_report.json", headers=team).json()
    assert report["study"]["stopped"] == "time" and report["study"]["budget_seconds"] == 0.5
    assert len(trial_rows(sessions, job_id)) == len(report["study"]["trials"]) < 1000


def test_the_accepted_request_lists_its_defaults_and_retries_return_the_same_job(
        queue_only_client, team, tiny, data) -> None:
    request = tuning(tiny, data, space={"ties": {"density": 0.5}, "tsv": {}})
    first = queue_only_client.post("/v1/tunings?label=study=a", json=request,
                                   headers={**team, "Idempotency-Key": "tune-1"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert job["spec"]["methods"] == ["ties", "tsv"] and job["spec"]["seed"] == 0 and job["labels"] == {"study": "a"}
    again = queue_only_client.post("/v1/tunings?label=study=a", json=request, headers={**team, "Idempotency-Key": "tune-1"})
    assert again.json()["id"] == job["id"]
    other = queue_only_client.post("/v1/tunings?label=study=a", json={**request, "trials": 3},
                                   headers={**team, "Idempotency-Key": "tune-1"})
    assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    listed = queue_only_client.get("/v1/tunings", params={"label": "study=a"}, headers=team).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert queue_only_client.post(f"/v1/tunings/{job['id']}:cancel", headers=team).json()["state"] == "cancelled"


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"methods": ["task_arithmetic", "nope"]}, "methods", "methods: unknown merge method 'nope'"),
    ({"space": {"ties": {"sharpness": [1, 2]}}}, "space.ties.sharpness", "space.ties.sharpness: not a parameter of 'ties'"),
    ({"space": {"tsv": {"scale": {"low": 0, "high": 1}}}}, "space.tsv.scale", "space.tsv.scale: a log range needs low > 0"),
    ({"space": {"ties": {"density": [0.5, float("nan")]}}}, "space.ties.density.1", "space.ties.density.1: nan is not a finite"),
    ({"dev": [{"dataset": "a\x00b"}]}, "dev.0.dataset", "dev.0.dataset: strings must not contain NUL characters"),
    ({"dev": []}, "dev", "dev: give at least one dev dataset"),
    ({"dev": [{"dataset": "EMPTY"}]}, "dev.0", "dev.0: dataset …empty.jsonl has no records"),
    ({"dev": [{"dataset": "OUTSIDE"}]}, "dev.0", "dev.0: dataset …is outside the allowed roots"),
    ({"test": [{"dataset": "OUTSIDE"}]}, "test.0", "test.0: dataset …is outside the allowed roots"),
    ({"objective": "qa", "dev": [{"dataset": "NOQA"}]}, "objective", "objective: qa needs dev records with a question"),
    ({"spec": {"models": [{"model": "MISSING"}, {"model": "MISSING"}]}}, "spec.models.0.model",
     "spec.models.0.model: …no such model folder"),
    ({"spec": {"seed": -1}}, "spec.seed", "spec.seed: the study's sampler takes a seed"),
    ({"spec": {"push_to_hub": {"repo_id": "org/x"}}}, "spec.push_to_hub",
     "spec.push_to_hub: only a merge can be pushed, not a tuning"),
    ({"spec": {"split": 2}}, "spec.split", "spec.split: only a merge can be split, not a tuning"),
    ({"timeout_s": 1e9}, "timeout_s", "timeout_s: must be under the job's time limit"),
    ({"trials": 0}, "trials", "trials: Input should be greater than or equal to 1"),
])
def test_bad_input_is_refused_naming_the_field(client, team, tiny, data, settings, tmp_path, change, field,
                                              message) -> None:
    roots = settings.allowed_roots[0]
    empty = roots / "tune-data" / "empty.jsonl"
    empty.write_text("\n")
    noqa = data["shapes"].parent / "noqa.jsonl"  # beside the images its records name
    noqa.write_text(data["shapes"].read_text().replace('"question"', '"q"').replace('"answer"', '"a"'))
    outside = tmp_path / "data.jsonl"
    outside.write_text(data["shapes"].read_text())
    paths = {"EMPTY": empty, "NOQA": noqa, "OUTSIDE": outside, "MISSING": roots / "no-such-model"}
    request = tuning(tiny, data)
    for key, value in change.items():
        if key == "spec":
            request["spec"] = {**request["spec"], **value}
        else:
            request[key] = value
    body = _replace_paths(request, {k: str(v) for k, v in paths.items()})
    before = client.get("/v1/tunings", headers=team).json()["jobs"]
    # As JSON text that may carry NaN, as Python's json (and many a client) writes it.
    response = client.post("/v1/tunings", content=json.dumps(body), headers={**team, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    head, _, tail = message.partition("…")
    assert response.json()["field"] == field and detail.startswith(head) and tail in detail, response.json()
    assert client.get("/v1/tunings", headers=team).json()["jobs"] == before  # nothing was accepted


def _replace_paths(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _replace_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, paths) for v in value]
    return paths.get(value, value) if isinstance(value, str) else value
