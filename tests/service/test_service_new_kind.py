"""Adding a job kind is one module: a kind declared in a module written to a temporary folder is
accepted and checked by the API, routed, listed on the dashboard, run by a real worker, and its
result read back (as tests/methods/test_new_method.py does for methods)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.settings import Settings
from tests.service.service_support import WorkerProcess, merge_spec, service_env, wait_final
from workers import kinds

MODULE = '''
"""Inventories: the bytes of safetensors of each model a spec names (a job kind of its own)."""
from pathlib import Path
import json

from pydantic import BaseModel, ConfigDict, Field

import pivotmerge
from pivotmerge.spec.schema import MergeSpec
from workers.kinds import JobKind, JobRun, Outcome, declare


class InventoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: MergeSpec
    note: str = Field("", max_length=40)


def run_inventory(run: JobRun) -> Outcome:
    spec = run.request.spec
    paths = [spec.base_model, *(m.model for m in spec.models)]
    sizes = {p: sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) for p in paths}
    report = {"note": run.request.note, "sizes": sizes}
    run.out_dir.mkdir(parents=True)
    (run.out_dir / "sizes.json").write_text(json.dumps(report, sort_keys=True))
    return Outcome(report, {"total_bytes": sum(sizes.values())})


INVENTORY = declare(JobKind(name="inventory", collection="inventories", noun="inventory", label="Inventory",
                            request=InventoryRequest, run=run_inventory, check_spec=pivotmerge.check, spec_field="spec"))
'''


@pytest.fixture(scope="module")
def kind_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module in a folder of its own, importable here (the API) and by the worker; the registry restored after."""
    folder = tmp_path_factory.mktemp("kinds")
    (folder / "inventory_kind.py").write_text(MODULE)
    saved = dict(kinds._REGISTRY)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("inventory_kind", None)
    kinds._REGISTRY.clear()
    kinds._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def inventory_stack(settings_values, broker_prefix, service_dir, kind_module) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """A worker and an API that both load the module (PIVOTMERGE_JOB_KIND_MODULES), on a queue of their own."""
    values = {**settings_values, "broker_key_prefix": broker_prefix.replace(":", "-kinds:"),
              "job_kind_modules": "inventory_kind"}
    env = service_env(values)
    env["PYTHONPATH"] = os.pathsep.join([str(kind_module), *filter(None, [env.get("PYTHONPATH")])])
    process = WorkerProcess(env, service_dir / "kinds-worker.log", "pmtest-kinds")
    with TestClient(create_app(Settings(**values))) as client:
        yield client
    process.stop()


def test_a_kind_from_one_new_module_is_routed_checked_run_and_read_back(inventory_stack, team, tiny) -> None:  # type: ignore[no-untyped-def]
    client = inventory_stack
    spec = merge_spec(tiny)
    accepted = client.post("/v1/inventories", json={"spec": spec, "note": "one module"}, headers=team)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert accepted.headers["Location"] == f"/v1/inventories/{job['id']}"
    assert job["kind"] == "inventory" and job["spec"]["note"] == "one module"

    done = wait_final(client, f"/v1/inventories/{job['id']}", team)
    assert done["state"] == "succeeded", done
    paths = [spec["base_model"], *(m["model"] for m in spec["models"])]
    sizes = {p: sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) for p in paths}
    assert client.get(f"/v1/inventories/{job['id']}/metrics", headers=team).json()["metrics"] == {
        "total_bytes": sum(sizes.values())}
    [artifact] = client.get(f"/v1/inventories/{job['id']}/artifacts", headers=team).json()["artifacts"]
    content = client.get(artifact["url"], headers=team).content
    assert artifact["name"] == "sizes.json" and hashlib.sha256(content).hexdigest() == artifact["sha256"]
    assert json.loads(content) == {"note": "one module", "sizes": sizes}

    # The kind's routes are the same as every kind's: another kind's collection does not know the job.
    assert client.get(f"/v1/merges/{job['id']}", headers=team).status_code == 404
    assert [j["id"] for j in client.get("/v1/inventories", headers=team).json()["jobs"]] == [job["id"]]
    assert client.get("/openapi.json").json()["paths"]["/v1/inventories"]["post"]["operationId"] == "create_inventory"
    # The dashboard lists it and has a page for its jobs.
    assert '<option value="inventories">Inventory</option>' in client.get("/ui/jobs").text
    assert client.get(f"/ui/inventories/{job['id']}").status_code == 200


def test_a_new_kind_is_checked_as_its_declaration_says(inventory_stack, team, tiny) -> None:  # type: ignore[no-untyped-def]
    client = inventory_stack
    missing = {**merge_spec(tiny), "base_model": str(Path(tiny.base).parent / f"gone-{uuid.uuid4().hex[:6]}")}
    refused = client.post("/v1/inventories", json={"spec": missing}, headers=team)
    assert refused.status_code == 422 and refused.json()["field"] == "spec.base_model", refused.text
    pushed: dict[str, Any] = {**merge_spec(tiny), "push_to_hub": {"repo_id": "org/m"}}
    assert client.post("/v1/inventories", json={"spec": pushed}, headers=team).json() == {
        "detail": "spec.push_to_hub: only a merge can be pushed, not an inventory", "field": "spec.push_to_hub"}
    split = client.post("/v1/inventories", json={"spec": {**merge_spec(tiny), "split": 2}}, headers=team).json()
    assert split == {"detail": "spec.split: only a merge can be split, not an inventory", "field": "spec.split"}


def test_every_built_in_kind_is_in_the_service_docs() -> None:
    """docs/service.md's API table names each declared kind's collection, as the routes do."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    built_in = [k for k in kinds.load_kinds() if k.name in ("merge", "analysis", "tuning")]
    assert [k.collection for k in built_in] == ["merges", "analyses", "tunings"]
    assert all(f"`POST /v1/{k.collection}" in docs for k in built_in)
