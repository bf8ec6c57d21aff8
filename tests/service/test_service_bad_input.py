"""Bad input answers a 4xx whose `field` names the culprit: never a 500, never an acceptance.

Each case is one a hand-made fault run found answering 500 or 202.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.service_support import merge_spec


def post_raw(client: TestClient, headers: dict[str, str], body: str) -> Any:
    return client.post("/v1/merges", content=body.encode("utf-8", "surrogatepass"),
                       headers={**headers, "Content-Type": "application/json"})


def assert_refused(response: Any, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    assert field.split(".")[0].split(":")[0] in body["detail"]


@pytest.mark.parametrize("range_header", ["bytes=²-", "bytes=٣-5", "bytes=1-²", "bytes=" + "9" * 5000 + "-",
                                          "bytes=-" + "9" * 5000, "bytes=x-1", "bytes=-"])
def test_malformed_or_huge_ranges_are_416_naming_range(client, finished, range_header: str) -> None:
    owner, job = finished
    url = f"/v1/merges/{job['id']}/artifacts/config.json"
    response = client.get(url, headers={**owner, "Range": range_header.encode()})  # raw UTF-8 bytes on the wire
    if range_header == "bytes=-" + "9" * 5000:  # a suffix longer than the file is the whole file
        assert response.status_code == 206 and response.content == client.get(url, headers=owner).content
        return
    assert_refused(response, 416, "Range")


@pytest.mark.parametrize("name", ["%00", "a%00b", "config.json%00"])
def test_nul_in_an_artifact_name_is_422_naming_it(client, finished, name: str) -> None:
    owner, job = finished
    assert_refused(client.get(f"/v1/merges/{job['id']}/artifacts/{name}", headers=owner), 422, "name")


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("token", [
    _b64("[" * 3000 + "]" * 3000),
    _b64(json.dumps(["2026-01-01T00:00:00", "not-a-uuid"])),
    _b64(json.dumps(["9999-99-99", "00000000-0000-0000-0000-000000000000"])),
    _b64("1." + "0" * 32 + "x"),
    _b64("9" * 40 + "." + "0" * 32),
    "ab\u00e9", "%", "A" * 5000,
])
def test_forged_page_tokens_are_422(client, team, token: str) -> None:
    assert_refused(client.get("/v1/merges", params={"page_token": token}, headers=team), 422, "page_token")


def _spec_text(tiny, **replace: str) -> str:
    """The spec as JSON text, with placeholders replaced by raw (possibly non-standard) JSON."""
    spec = merge_spec(tiny)
    spec["parameters"] = {"lambda": "@LAMBDA@"}
    spec["models"][0]["weight"] = "@WEIGHT@"
    text = json.dumps(spec)
    values = {"LAMBDA": "1.0", "WEIGHT": "1.0", **replace}
    for key, value in values.items():
        text = text.replace(f'"@{key}@"', value)
    return text


@pytest.mark.parametrize("where,value,field", [
    ("LAMBDA", "NaN", "parameters.lambda"),
    ("LAMBDA", "Infinity", "parameters.lambda"),
    ("LAMBDA", "-Infinity", "parameters.lambda"),
    ("LAMBDA", "1e309", "parameters.lambda"),
    ("LAMBDA", "[0.5, NaN]", "parameters.lambda"),
    ("LAMBDA", '[{"value": 1e309}]', "parameters.lambda"),
    ("LAMBDA", '"1e400"', "parameters.lambda"),  # a string the method's float field would read as inf
    ("WEIGHT", "NaN", "models.0.weight"),
    ("WEIGHT", '"abc"', "models.0.weight"),
    ("WEIGHT", '[{"filter": "x", "value": "abc"}]', "models.0.weight"),
])
def test_non_finite_or_non_numeric_values_are_422(queue_only_client, team, tiny, where, value, field) -> None:
    assert_refused(post_raw(queue_only_client, team, _spec_text(tiny, **{where: value})), 422, field)


def test_a_400_digit_shard_size_is_422(queue_only_client, team, tiny) -> None:
    text = json.dumps(merge_spec(tiny, out_shard_size=1)).replace('"out_shard_size": 1', '"out_shard_size": ' + "9" * 400)
    assert_refused(post_raw(queue_only_client, team, text), 422, "out_shard_size")


def test_nan_in_the_seed_or_limit_is_422(queue_only_client, team, tiny) -> None:
    text = json.dumps(merge_spec(tiny, seed=1)).replace('"seed": 1', '"seed": NaN')
    assert_refused(post_raw(queue_only_client, team, text), 422, "seed")


def _mergekit(tiny, **extra: Any) -> dict[str, Any]:
    return {"merge_method": "task_arithmetic", "base_model": str(tiny.base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in tiny.experts], **extra}


@pytest.mark.parametrize("change,field", [
    ({"parameters": 5}, "parameters"),
    ({"parameters": [1]}, "parameters"),
    ({"parameters": "x"}, "parameters"),
    ({"models": "x"}, "models"),
])
def test_mergekit_parameter_shapes_are_422(queue_only_client, team, tiny, change, field) -> None:
    assert_refused(queue_only_client.post("/v1/merges", json=_mergekit(tiny, **change), headers=team), 422, field)


@pytest.mark.parametrize("parameters", [7, [1], "x"])
def test_a_mergekit_models_parameters_of_the_wrong_shape_is_422(queue_only_client, team, tiny, parameters) -> None:
    config = _mergekit(tiny)
    config["models"][0]["parameters"] = parameters
    assert_refused(queue_only_client.post("/v1/merges", json=config, headers=team), 422, "models.0.parameters")


@pytest.mark.parametrize("path", ["~nosuchuser/model", "~nosuchuser", "~/model"])
def test_home_directory_paths_are_refused_naming_the_field(queue_only_client, team, tiny, path: str) -> None:
    spec = merge_spec(tiny)
    spec["models"][1]["model"] = path
    assert_refused(queue_only_client.post("/v1/merges", json=spec, headers=team), 422, "models.1.model")


def test_a_lone_surrogate_in_a_parameter_name_is_422(queue_only_client, team, tiny) -> None:
    text = _spec_text(tiny).replace('"lambda"', '"\\ud800"')
    response = post_raw(queue_only_client, team, text)
    assert response.status_code == 422, response.text
    assert response.json()["field"].startswith("parameters")
    assert "\\ud800" in response.json()["detail"]


def test_a_lone_surrogate_in_a_string_value_is_422(queue_only_client, team, tiny) -> None:
    text = json.dumps(merge_spec(tiny, include=["x"])).replace('"include": ["x"]', '"include": ["\\udfff"]')
    response = post_raw(queue_only_client, team, text)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "include.0"


def test_nul_in_a_spec_string_is_422(queue_only_client, team, tiny) -> None:
    spec = merge_spec(tiny, include=["a\u0000b"])
    response = queue_only_client.post("/v1/merges", json=spec, headers=team)
    assert response.status_code == 422 and "NUL" in response.json()["detail"]


# ------------------------------------------------------------------ datasets, checked at submit


@pytest.fixture(scope="module")
def datasets(settings, tmp_path_factory) -> dict[str, Path]:
    """One dataset inside the allowed root, one outside, and ways of reaching the outside one from inside."""
    from pivotmerge.data.example import make_dataset

    root = settings.allowed_roots[0] / f"datasets-{uuid.uuid4().hex[:6]}"
    outside = make_dataset(tmp_path_factory.mktemp("outside"), "shapes", 2)
    inside = make_dataset(root / "in", "shapes", 2)
    (root / "link.jsonl").symlink_to(outside)
    escaping = root / "escaping"
    escaping.mkdir()
    image = json.loads(outside.read_text().splitlines()[0])["image"]
    record = {"image": os.path.relpath(outside.parent / image, escaping), "caption": "a shape"}
    (escaping / "data.jsonl").write_text(json.dumps(record) + "\n")
    dotdot = root / "in" / ".." / os.path.relpath(outside, root)
    return {"inside": inside, "outside": outside, "link": root / "link.jsonl", "image_outside": escaping / "data.jsonl",
            "dotdot": dotdot}


@pytest.mark.parametrize("which", ["outside", "link", "image_outside", "dotdot"])
@pytest.mark.parametrize("where", ["evaluate.0", "calibration", "models.1.calibration"])
def test_datasets_outside_the_allowed_roots_are_refused_at_submit(queue_only_client, team, tiny, datasets,
                                                                 which: str, where: str) -> None:
    spec = merge_spec(tiny)
    ref = {"dataset": str(datasets[which])}
    if where == "evaluate.0":
        spec["evaluate"] = [{"dataset": str(datasets["inside"])}, ref][::-1]
    elif where == "calibration":
        spec["calibration"] = ref
    else:
        spec["models"][1]["calibration"] = ref
    response = queue_only_client.post("/v1/merges", json=spec, headers=team)
    assert_refused(response, 422, f"{where}.dataset")
    assert "outside the allowed roots" in response.json()["detail"]


def test_a_dataset_inside_the_allowed_roots_is_accepted(queue_only_client, team, tiny, datasets, sessions) -> None:
    spec = merge_spec(tiny, evaluate=[{"dataset": str(datasets["inside"])}])
    response = queue_only_client.post("/v1/merges", json=spec, headers=team)
    assert response.status_code == 202, response.text
    queue_only_client.post(f"/v1/merges/{response.json()['id']}:cancel", headers=team)


def test_a_missing_home_folder_in_a_dataset_path_is_refused(queue_only_client, team, tiny) -> None:
    spec = merge_spec(tiny, evaluate=[{"dataset": "~nosuchuser/data.jsonl"}])
    assert_refused(queue_only_client.post("/v1/merges", json=spec, headers=team), 422, "evaluate.0.dataset")


def test_a_lone_surrogate_in_a_mergekit_key_is_422(queue_only_client, team, tiny) -> None:
    text = json.dumps(_mergekit(tiny)).replace('"merge_method"', '"\\udc00": 1, "merge_method"')
    response = post_raw(queue_only_client, team, text)
    assert response.status_code == 422 and response.json()["field"] == "\\udc00", response.text
