"""The dashboard in headless Chromium against the real service: every page, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from selenium.common.exceptions import StaleElementReferenceException
from sqlalchemy import select
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from service_core.models import Trial
from pivotmerge.data.example import ExampleSet
from pivotmerge.models.multiway import MultiwayVLConfig, MultiwayVLModel
from tests.service.service_support import merge_spec, submit_and_freeze, wait_final
from tests.ui.conftest import NARROW, WIDE, clear

TIMEOUT = 30
JOB_TIMEOUT = 180  # a worker's first job imports the engine and, here, evaluates four models: slow on a busy machine


def wait(browser: WebDriver, condition: Any, what: str, timeout: float = TIMEOUT) -> Any:
    # The jobs list re-renders while it polls: an element read mid-render is read again.
    return WebDriverWait(browser, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
                         ).until(lambda b: condition(b), message=what)


def find(browser: WebDriver, css: str) -> Any:
    return browser.find_element(By.CSS_SELECTOR, css)


def find_all(browser: WebDriver, css: str) -> list[Any]:
    return browser.find_elements(By.CSS_SELECTOR, css)


def sign_in(browser: WebDriver, server: str, headers: dict[str, str]) -> None:
    browser.get(f"{server}/ui/sign-in")
    find(browser, "#api-key").send_keys(headers["Authorization"].removeprefix("Bearer "))
    find(browser, "#sign-in-form button").click()
    wait(browser, lambda b: b.current_url.endswith("/ui/jobs"), "the jobs page after signing in")


def set_viewport(browser: WebDriver, width: int, height: int) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def screenshot(browser: WebDriver, folder: Path, name: str) -> None:
    """The page in a wide and a narrow viewport, and the whole wide page; then the browser's own size again."""
    browser.execute_script("window.scrollTo(0, 0)")
    for label, (width, height) in (("wide", WIDE), ("narrow", NARROW)):
        set_viewport(browser, width, height)
        assert browser.save_screenshot(str(folder / f"{name}-{label}.png"))
    set_viewport(browser, WIDE[0], WIDE[1])
    set_viewport(browser, WIDE[0], browser.execute_script("return document.documentElement.scrollHeight"))
    assert browser.save_screenshot(str(folder / f"{name}-full.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def eval_spec(example: ExampleSet, method: str) -> dict[str, Any]:
    # One dataset and no evaluation of the inputs: each evaluated model costs seconds.
    return merge_spec(example, method, components=["projector"],
                      evaluate=[{"dataset": str(example.datasets["shapes"]), "name": "shapes"}])


def report_of(http: httpx.Client, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    return http.get(f"/v1/merges/{job_id}/artifacts/merge_report.json", headers=headers).json()


def event_seqs(browser: WebDriver) -> list[int]:
    return [int(li.get_attribute("data-seq")) for li in find_all(browser, "#events li")]


def test_sign_in_keeps_the_key_in_the_session_and_out_of_urls(browser, server, team, screenshots) -> None:
    browser.get(f"{server}/ui/jobs")
    wait(browser, lambda b: b.current_url.endswith("/ui/sign-in"), "a signed-out visit to go to sign-in")
    screenshot(browser, screenshots, "sign-in")
    find(browser, "#api-key").send_keys("pm_not-a-key")
    find(browser, "#sign-in-form button").click()
    wait(browser, lambda b: find(b, "#sign-in-error").text == "This key is not valid.", "the bad key to be refused")

    key = team["Authorization"].removeprefix("Bearer ")
    sign_in(browser, server, team)
    assert browser.execute_script("return sessionStorage.getItem('pivotmerge.api_key')") == key
    assert key not in browser.current_url
    assert key not in browser.page_source  # never rendered into a page


def test_merge_from_the_form_to_progress_metrics_and_download(
        browser, server, http, team, example, worker, screenshots, downloads) -> None:
    sign_in(browser, server, team)
    browser.get(f"{server}/ui/new")
    wait(browser, lambda b: len(find_all(b, "#method option")) > 5, "methods from /v1/methods")
    Select(find(browser, "#method")).select_by_value("task_arithmetic")
    # Its scale parameter (the first number it takes), whatever the method calls it.
    listed = next(m for m in http.get("/v1/methods", headers=team).json()["methods"] if m["name"] == "task_arithmetic")
    scale = next(p for p in listed["parameters"] if p["json_schema"].get("type") == "number")
    scale_input = wait(browser, lambda b: find_all(b, f"#param-{scale['name']}"), "task_arithmetic's parameters")[0]
    assert json.loads(scale_input.get_attribute("value")) == scale["default"] == 1.0
    find(browser, "#base-model").send_keys(str(example.base))
    expert_inputs = find_all(browser, "#experts input")
    expert_inputs[0].send_keys(str(example.experts[0]))
    expert_inputs[1].send_keys(str(example.root.parent / "nowhere"))  # not a repo: the API names models.1.model
    for domain in ("shapes", "dots"):
        find(browser, "#add-evaluate").click()
        find_all(browser, "#evaluate input")[-1].send_keys(str(example.datasets[domain]))
    find(browser, "#submit-merge").click()
    error = wait(browser, lambda b: find(b, '[data-field="models.1.model"] .field-error').text,
                 "the API's error beside the second expert")
    assert error.startswith("models.1.model:") and "nowhere" in error
    screenshot(browser, screenshots, "new-merge-error")

    expert_inputs[1].clear()
    expert_inputs[1].send_keys(str(example.experts[1]))
    scale_input.clear()
    scale_input.send_keys("0.5")
    find(browser, "#submit-merge").click()
    wait(browser, lambda b: "/ui/merges/" in b.current_url, "the new job's page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    job = http.get(f"/v1/merges/{job_id}", headers=team).json()
    assert job["spec"]["parameters"] == {scale["name"]: 0.5} and job["spec"]["evaluate_inputs"] is True

    wait(browser, lambda b: find(b, "#progress").get_attribute("aria-valuenow") == "100", "the progress bar at 100%",
         JOB_TIMEOUT)
    wait(browser, lambda b: find(b, "#job-state").text == "succeeded", "the succeeded badge")
    events = http.get(f"/v1/merges/{job_id}/events", headers=team).json()["events"]
    wait(browser, lambda b: event_seqs(b) == [e["seq"] for e in events], "every stored event in the log, in order")
    assert any(e["type"] == "progress" for e in events)

    # The chart: one bar per model and dataset, each the value in the merge report.
    wait(browser, lambda b: find_all(b, "#metrics-chart rect.bar"), "the metrics chart")
    metric = Select(find(browser, "#metric-choice")).first_selected_option.text
    assert metric == "token_accuracy"
    evaluation = report_of(http, team, job_id)["evaluation"]
    expected = {(Path(model).name, row["dataset"]): row[metric] for model, rows in evaluation.items() for row in rows}
    bars = {(r.get_attribute("data-series"), r.get_attribute("data-label")): float(r.get_attribute("data-value"))
            for r in find_all(browser, "#metrics-chart rect.bar")}
    assert set(bars) == {(m, d) for m in ("merged", "base", "expert_1", "expert_2") for d in ("shapes", "dots")}
    assert bars == expected
    layer_rows = find_all(browser, "#layers tbody tr")
    assert len(layer_rows) == len(report_of(http, team, job_id)["layers"])
    screenshot(browser, screenshots, "job-merge")

    artifacts = {a["name"]: a for a in http.get(f"/v1/merges/{job_id}/artifacts", headers=team).json()["artifacts"]}
    clear(downloads)
    find(browser, '[data-artifact="model.safetensors"]').click()
    target = downloads / "model.safetensors"
    wait(browser, lambda b: target.is_file() and target.stat().st_size == artifacts["model.safetensors"]["size"],
         "the download to finish")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == artifacts["model.safetensors"]["sha256"]


def test_cancel_a_running_job_and_resume_the_stream(browser, server, http, team, example, worker, sessions,
                                                    screenshots) -> None:
    job_id, pid = submit_and_freeze(http, team, sessions, merge_spec(example))
    try:
        sign_in(browser, server, team)
        browser.get(f"{server}/ui/merges/{job_id}")
        wait(browser, lambda b: find(b, "#job-state").text == "running", "the running badge")
        cancel = wait(browser, lambda b: find(b, "#cancel").is_displayed() and find(b, "#cancel"), "the cancel button")
        seen = wait(browser, lambda b: event_seqs(b), "the events so far")
        browser.execute_script("window.jobStream.drop()")  # a lost connection: reopened with Last-Event-ID
        cancel.click()
        wait(browser, lambda b: find(b, "#job-state").text == "cancelling", "the cancelling badge")
        screenshot(browser, screenshots, "job-cancelling")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait(browser, lambda b: find(b, "#job-state").text == "cancelled", "the cancelled badge from the stream",
         JOB_TIMEOUT)
    assert wait_final(http, f"/v1/merges/{job_id}", team, JOB_TIMEOUT)["state"] == "cancelled"
    stored = [e["seq"] for e in http.get(f"/v1/merges/{job_id}/events", headers=team).json()["events"]]
    wait(browser, lambda b: event_seqs(b) == stored, "each stored event exactly once after the reconnect")
    assert len(stored) > len(seen)
    assert not find(browser, "#cancel").is_displayed()


def test_another_teams_job_is_not_found(browser, server, http, team, other_team, unread_queue: TestClient,
                                        example) -> None:
    job_id = unread_queue.post("/v1/merges", json=merge_spec(example), headers=team).json()["id"]
    sign_in(browser, server, other_team)
    browser.get(f"{server}/ui/merges/{job_id}")
    wait(browser, lambda b: find(b, "#not-found").is_displayed(), "not found")
    assert "Not found" in find(browser, "#not-found").text
    assert not find(browser, "#job-body").is_displayed()
    browser.get(f"{server}/ui/jobs")
    wait(browser, lambda b: find(b, "#jobs-empty").is_displayed(), "an empty list for the other team")


def test_jobs_list_pages_filters_and_updates_live(browser, server, team, unread_queue: TestClient, example,
                                                 screenshots) -> None:
    def submit(collection: str, label: str | None = None) -> str:
        query = f"?label={label}" if label else ""
        response = unread_queue.post(f"/v1/{collection}{query}", json=merge_spec(example), headers=team)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    ids = [submit("merges") for _ in range(5)] + [submit("analyses", "group=b") for _ in range(2)]
    newest_first = ids[::-1]
    sign_in(browser, server, team)
    Select(find(browser, "#page-size")).select_by_value("5")
    shown = lambda b: [tr.get_attribute("data-job-id") for tr in find_all(b, "#jobs tbody tr")]  # noqa: E731
    wait(browser, lambda b: shown(b) == newest_first[:5], "the first page, analyses and merges by creation time")
    wait(browser, lambda b: {badge.text for badge in find_all(b, "#jobs tbody .badge")} == {"waiting"}, "waiting badges")
    # This deployment has no worker: each job shows its place in the queue, and no start time.
    places = lambda b: [td.text for td in find_all(b, "#jobs tbody td.queue")]  # noqa: E731
    wait(browser, lambda b: len(places(b)) == 5 and all(re.fullmatch(r"#\d+ in the queue · no worker is live", text)
                                                         for text in places(b)), "queue positions")
    screenshot(browser, screenshots, "jobs")
    find(browser, "#next-page").click()
    wait(browser, lambda b: shown(b) == newest_first[5:], "the second page")
    assert not find(browser, "#next-page").is_enabled()

    find(browser, "#first-page").click()
    Select(find(browser, "#filter-kind")).select_by_value("analyses")
    wait(browser, lambda b: shown(b) == newest_first[:2], "only analyses")
    Select(find(browser, "#filter-kind")).select_by_value("")
    Select(find(browser, "#filter-state")).select_by_value("succeeded")
    wait(browser, lambda b: shown(b) == [], "no succeeded jobs")
    Select(find(browser, "#filter-state")).select_by_value("waiting")
    wait(browser, lambda b: shown(b)[:5] == newest_first[:5], "waiting jobs")
    find(browser, "#filter-label").send_keys("group=b", Keys.ENTER)
    wait(browser, lambda b: shown(b) == newest_first[:2], "only the jobs labelled group=b")
    assert [td.text for td in find_all(browser, "#jobs tbody td.labels")] == ["group=b", "group=b"]
    find(browser, "#filter-label").clear()
    find(browser, "#filter-label").send_keys(Keys.ENTER)

    newer = submit("merges")  # appears without a reload
    wait(browser, lambda b: shown(b)[:1] == [newer], "the new job, live")  # [:1]: the list may be empty mid-reload

    browser.get(f"{server}/ui/merges/{newer}")  # a waiting job's page: its place in the queue, and a cancel
    wait(browser, lambda b: re.search(r"Queue\s+#\d+ in the queue · no worker is live", find(b, "#facts").text),
         "the job's place in the queue")
    assert find(browser, "#cancel").is_displayed()


def test_compare_two_merges_of_the_same_experts(browser, server, http, team, example, worker, screenshots) -> None:
    ids = []
    for method in ("task_arithmetic", "ties"):
        ids.append(http.post("/v1/merges", json=eval_spec(example, method), headers=team).json()["id"])
    for job_id in ids:
        assert wait_final(http, f"/v1/merges/{job_id}", team, JOB_TIMEOUT)["state"] == "succeeded"
    sign_in(browser, server, team)
    browser.get(f"{server}/ui/compare")
    wait(browser, lambda b: len(find_all(b, "#candidates input")) == 2, "the two finished merges")
    for box in find_all(browser, "#candidates input"):
        box.click()
    find(browser, "#compare-button").click()
    wait(browser, lambda b: find_all(b, "#compare-table tbody tr"), "the comparison table")
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in find_all(browser, "#compare-table tbody tr")]
    head = [th.text for th in find_all(browser, "#compare-table th")]
    for job_id in ids:
        merged = {r["dataset"]: r["token_accuracy"] for r in report_of(http, team, job_id)["evaluation"]["merged"]}
        column = next(i for i, h in enumerate(head) if h.endswith(job_id[:8]))
        # The table shows 4 decimals (JS toFixed), so a cell is the value to half a unit of the 4th.
        assert {row[0]: float(row[column]) for row in rows} == pytest.approx(merged, abs=5e-5 + 1e-12)
    assert {r.get_attribute("data-series") for r in find_all(browser, "#compare-chart rect.bar")} >= set(head[1:3])
    screenshot(browser, screenshots, "compare")


def test_analysis_page_charts_each_layers_distance(browser, server, http, team, example, worker, screenshots) -> None:
    # The projector only: analysing every tensor of even the tiny model takes seconds.
    spec = merge_spec(example, components=["projector"])
    job_id = http.post("/v1/analyses", json=spec, headers=team).json()["id"]
    report = wait_final(http, f"/v1/analyses/{job_id}", team, JOB_TIMEOUT)
    assert report["state"] == "succeeded"
    metrics = http.get(f"/v1/analyses/{job_id}/metrics", headers=team).json()["metrics"]
    sign_in(browser, server, team)
    browser.get(f"{server}/ui/analyses/{job_id}")
    wait(browser, lambda b: find_all(b, "#distances-chart rect.bar"), "the distance chart")
    metric = Select(find(browser, "#distance-choice")).first_selected_option.text
    bars = {r.get_attribute("data-label"): float(r.get_attribute("data-value"))
            for r in find_all(browser, "#distances-chart rect.bar")}
    assert bars == {layer: values[metric] for layer, values in metrics["layers"].items()}
    screenshot(browser, screenshots, "job-analysis")


def test_tuning_page_shows_every_trial_and_charts_the_objective(browser, server, http, team, example, worker, sessions,
                                                                 screenshots) -> None:
    # A grid of five settings, one of which breaks the model: run in the worker's own process (the embedded default).
    request = {"spec": merge_spec(example, components=["projector"]), "objective": "loss", "trials": 5,
               "space": {"task_arithmetic": {"scale": [0.5, 1.0, 1e38]}, "ties": {"scale": 1.0, "density": [0.5, 1.0]}},
               "dev": [{"dataset": str(example.datasets["shapes"])}], "test": [{"dataset": str(example.datasets["dots"])}]}
    created = http.post("/v1/tunings", json=request, headers=team)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert wait_final(http, f"/v1/tunings/{job_id}", team, JOB_TIMEOUT)["state"] == "succeeded"
    with sessions() as session:
        trials = session.scalars(select(Trial).where(Trial.job_id == uuid.UUID(job_id)).order_by(Trial.number)).all()
    assert [t.state for t in trials] == ["complete", "complete", "failed", "complete", "complete"]

    sign_in(browser, server, team)
    Select(find(browser, "#filter-kind")).select_by_value("tunings")
    wait(browser, lambda b: [tr.get_attribute("data-job-id") for tr in find_all(b, "#jobs tbody tr")] == [job_id],
         "the tuning alone under the kind filter")
    assert find(browser, "#jobs tbody tr td:nth-child(5)").text == "task_arithmetic, ties"
    screenshot(browser, screenshots, "jobs-tunings")

    browser.get(f"{server}/ui/tunings/{job_id}")
    wait(browser, lambda b: find_all(b, "#metrics-chart rect.bar"), "the chosen trial's dev and test scores")
    # Read in one script run each: the page redraws the table and chart as trial events replay.
    rows = wait(browser, lambda b: (r := b.execute_script(
        "return [...document.querySelectorAll('#trials-table tbody tr')]"
        ".map((tr) => [tr.className, ...[...tr.cells].map((td) => td.textContent)])")) and len(r) == len(trials) and r,
        "a row per trial")
    # Each row is its trial in Postgres: number, candidate, dev loss (4 decimals shown) or the error, state, worker.
    for (style, *cells), trial in zip(rows, trials):
        assert (int(cells[0]), cells[1], cells[4], cells[6]) == (trial.number, trial.label, trial.state, trial.worker)
        if trial.objective is None:
            assert cells[3] == trial.error
        else:
            assert float(cells[3]) == pytest.approx(trial.objective, abs=5e-5 + 1e-12)
    scored = {t.number: t.objective for t in trials if t.objective is not None}
    assert [int(cells[0]) for style, *cells in rows if style == "best"] == [min(scored, key=scored.get)]
    # The chart: a point per scored trial at its objective, coloured by candidate; the failed one a cross.
    chart = browser.execute_script(
        "const c = document.getElementById('trials-chart'), at = (n, a) => n.getAttribute(a);"
        "return {points: [...c.querySelectorAll('circle.point')].map((p) => [at(p, 'data-x'), at(p, 'data-series'),"
        " at(p, 'data-value')]), marks: [...c.querySelectorAll('text.mark')].map((m) => at(m, 'data-x')),"
        " rings: c.querySelectorAll('circle.ring').length, steps: c.querySelectorAll('path.step').length}")
    assert {int(x): (series, float(value)) for x, series, value in chart["points"]} == {
        t.number: (t.label, t.objective) for t in trials if t.objective is not None}
    assert chart["marks"] == ["2"] and chart["rings"] == 1 and chart["steps"] == 1
    labels = {r.get_attribute("data-label") for r in find_all(browser, "#metrics-chart rect.bar")}
    assert labels == {"shapes (dev)", "dots (test)"}
    screenshot(browser, screenshots, "job-tuning")


def test_fold_page_shows_its_state_metrics_and_artifacts(browser, server, http, team, settings, worker,
                                                         screenshots) -> None:
    # A tiny modality-specific model under the allowed root, folded by interpolation through the API.
    torch.manual_seed(0)
    model = MultiwayVLModel(MultiwayVLConfig(hidden_size=8, num_layers=3, num_heads=2, vl_layers=2, image_size=8,
                                             patch_size=4, vocab_size=10, max_text_len=4))
    folder = settings.allowed_roots[0] / f"multiway-ui-{uuid.uuid4().hex[:6]}"
    model.save_pretrained(folder)
    job_id = http.post("/v1/folds", json={"spec": {"model": str(folder), "method": "interpolation"}},
                       headers=team).json()["id"]
    assert wait_final(http, f"/v1/folds/{job_id}", team, JOB_TIMEOUT)["state"] == "succeeded"
    artifacts = http.get(f"/v1/folds/{job_id}/artifacts", headers=team).json()["artifacts"]

    sign_in(browser, server, team)
    browser.get(f"{server}/ui/jobs")
    wait(browser, lambda b: any(o.get_attribute("value") == "folds" for o in find_all(b, "option")),
         "folds among the job kinds")
    browser.get(f"{server}/ui/folds/{job_id}")
    wait(browser, lambda b: find(b, "#job-state").text == "succeeded", "the fold's final state")
    wait(browser, lambda b: len(find_all(b, "#artifacts tbody tr")) == len(artifacts), "every artifact listed")
    shown = {row.find_element(By.CSS_SELECTOR, "td").text: row.find_element(By.CSS_SELECTOR, "code.sha").text
             for row in find_all(browser, "#artifacts tbody tr")}
    assert shown == {a["name"]: a["sha256"] for a in artifacts}
    screenshot(browser, screenshots, "job-fold")
