"""A merge that asks for evaluation, end to end: its metrics reach /metrics, the job row and merge_report.json alike."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from fastapi.testclient import TestClient

from service_core.models import Job
from service_core.settings import Settings
from pivotmerge.data.datasets import load_dataset
from pivotmerge.data.evaluate import evaluate_model
from pivotmerge.data.example import ExampleSet, make_example
from pivotmerge.report.merge_report import read_report
from tests.service.service_support import merge_spec, wait_final

SAMPLES = 2


@pytest.fixture(scope="module")
def with_data(settings: Settings) -> ExampleSet:
    """A tiny base + 2 experts and rendered datasets, under the allowed root."""
    return make_example(settings.allowed_roots[0] / "with-data", n_experts=2, with_data=True, n_samples=SAMPLES)


def test_metrics_of_an_evaluated_merge_equal_its_report_and_job_row(client: TestClient, team, with_data, worker,
                                                                   sessions, tmp_path) -> None:
    spec = merge_spec(with_data, evaluate=[{"name": "dots", "dataset": str(with_data.datasets["dots"])},
                                           {"name": "shapes", "dataset": str(with_data.datasets["shapes"])}],
                      evaluate_inputs=True)
    created = client.post("/v1/merges", json=spec, headers=team)
    assert created.status_code == 202, created.text
    location = created.headers["Location"]
    done = wait_final(client, location, team, timeout=240)
    assert done["state"] == "succeeded", done

    response = client.get(f"{location}/metrics", headers=team)
    assert response.status_code == 200
    body = response.json()
    assert body["job_id"] == done["id"] and body["state"] == "succeeded"
    metrics = body["metrics"]
    experts = [str(e) for e in with_data.experts]
    assert set(metrics) == {"merged", "base", *experts}  # in Postgres' JSONB order, not the report's
    for label, rows in metrics.items():
        assert [r["dataset"] for r in rows] == ["dots", "shapes"], label
        for row in rows:
            assert row["samples"] == SAMPLES and row["tokens"] > 0 and row["questions"] == SAMPLES
            assert row["caption_loss"] > 0 and math.isclose(row["perplexity"], math.exp(row["caption_loss"]))
            assert 0 <= row["token_accuracy"] <= 1 and 0 <= row["exact_match"] <= 1

    # The downloaded merge_report.json holds the same numbers, and reads back as a MergeReport.
    (artifact,) = [a for a in client.get(f"{location}/artifacts", headers=team).json()["artifacts"]
                   if a["name"] == "merge_report.json"]
    downloaded = client.get(artifact["url"], headers=team)
    assert downloaded.status_code == 200
    assert json.loads(downloaded.content)["evaluation"] == metrics
    (tmp_path / "merge_report.json").write_bytes(downloaded.content)
    report = read_report(tmp_path)
    assert {label: [m.model_dump() for m in rows] for label, rows in report.evaluation.items()} == metrics

    # So does the job's row in Postgres, in its metrics and in its stored report.
    with sessions() as session:
        job = session.get(Job, uuid.UUID(done["id"]))
        assert job.metrics == metrics
        assert job.report["evaluation"] == metrics
        assert job.report["method"] == "task_arithmetic" and job.report["files"] == json.loads(downloaded.content)["files"]

    # And the numbers are the base's real scores: evaluating its folder here gives them again.
    (base_dots,) = evaluate_model(with_data.base, [load_dataset(with_data.datasets["dots"])], device="cpu")
    assert metrics["base"][0]["caption_loss"] == pytest.approx(base_dots.caption_loss, rel=1e-6)
