"""The two API routes the dashboard's form reads: /v1/methods and /v1/inputs."""

from __future__ import annotations

import os
from dataclasses import asdict

import httpx
from fastapi.testclient import TestClient

from service_core.settings import Settings
from pivotmerge.data.example import ExampleSet
from pivotmerge.methods import all_methods
from tests.service.service_support import merge_spec


def test_methods_lists_the_registry_with_parameters_and_defaults(http: httpx.Client, team) -> None:
    assert http.get("/v1/methods").status_code == 401
    response = http.get("/v1/methods", headers=team)
    assert response.status_code == 200
    listed = {m["name"]: m for m in response.json()["methods"]}
    registry = all_methods()
    assert list(listed) == list(registry)
    for name, method in registry.items():
        params = {p["name"]: p for p in listed[name]["parameters"]}
        assert listed[name]["base_model"] == method.base
        assert (listed[name]["min_models"], listed[name]["max_models"]) == (method.min_models, method.max_models)
        assert not set(params) & set(method.engine_params)  # filled from calibration data, never in a spec
        # Each listed default is what the params model takes when the spec sets nothing.
        defaults = method.params().model_dump(by_alias=True)
        assert {n: p["default"] for n, p in params.items()} == {n: defaults[n] for n in params}
    assert listed["regmean"]["calibration_data"] == ["grams", "merged_input_grams", "cross_grams"]
    assert listed["task_arithmetic"]["calibration_data"] == []
    assert listed["pivotmerge"]["defaults_with_calibration"] == {
        "combine": "gram", "gram_inputs": "merged", "expert_target": "own_inputs", "off_diagonal_scale": 1.0,
        "spectrum": "keep", "residual_weight": 1.0,
        "scale_min": 1.0, "scale_max": 1.0}
    assert listed["regmean"]["defaults_with_calibration"] == {}
    for name, method in registry.items():  # tuning's search ranges, where a method marks them
        searched = {p["name"]: p["search"] for p in listed[name]["parameters"] if p["search"]}
        assert searched == {n: {**asdict(s), "choices": s.choices and list(s.choices)} for n, s in method.search_space.items()}
    assert listed["ties"]["parameters"][[p["name"] for p in listed["ties"]["parameters"]].index("density")]["per_model"]
    assert {p["name"] for p in listed["regmean"]["parameters"]}.isdisjoint({"grams", "cross_grams"})
    rescale = next(p for p in listed["dare_linear"]["parameters"] if p["name"] == "rescale")
    assert rescale["json_schema"]["enum"] == ["inverse_density", "l1", "none"]


def test_every_listed_default_is_accepted_back_in_a_spec(http: httpx.Client, team, unread_queue: TestClient,
                                                         example: ExampleSet) -> None:
    """What the form pre-fills must pass the API's validation, for every method."""
    for method in http.get("/v1/methods", headers=team).json()["methods"]:
        parameters = {p["name"]: p["default"] for p in method["parameters"] if p["default"] is not None}
        spec = merge_spec(example, method["name"], parameters=parameters,
                          calibration={"dataset": str(example.datasets["shapes"])})
        response = unread_queue.post("/v1/merges", json=spec, headers=team)
        assert response.status_code == 202, (method["name"], response.json())


def test_inputs_lists_repos_and_datasets_under_the_allowed_roots(http: httpx.Client, team, example: ExampleSet,
                                                                  settings: Settings, tmp_path) -> None:
    outside = tmp_path / "outside_repo"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    link = example.root / "linked_outside"
    if not link.exists():
        os.symlink(outside, link)
    assert http.get("/v1/inputs").status_code == 401
    body = http.get("/v1/inputs", headers=team).json()
    assert {str(example.base), *map(str, example.experts)} <= set(body["models"])
    assert {str(p) for p in example.datasets.values()} <= set(body["datasets"])
    roots = [str(r) for r in settings.allowed_roots]
    assert all(any(m.startswith(r) for r in roots) for m in body["models"] + body["datasets"])
    assert str(link) not in body["models"] and str(outside) not in body["models"]
    assert not any(m.startswith(str(example.base) + "/") for m in body["models"])  # a repo's sub-folders are not repos
