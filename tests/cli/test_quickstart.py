"""The first minute: the trained example (`make-example --data`) and `pivotmerge quickstart`, as a user runs them.

Both use the small world of `pivotmerge/bench/trained_example.py`, built once for
this module (about a minute on 2 idle cores, two or more on a busy machine) and
read back from the cache after that. The quickstart's last table must show what
merging buys: every expert best on its own domain, the merged model far above
the base on every domain and close to each expert on that expert's domain.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from core.storage import file_sha256
from pivotmerge.bench.domains import DOMAINS
from pivotmerge.bench.trained_example import SMALL
from pivotmerge.bench.world import build_world
from pivotmerge.spec.schema import spec_from_dict

# The margins the quickstart's table keeps (token accuracy on the test splits; seed 0 has 0.23-0.46,
# 0.26-0.70 and at most 0.05).
EXPERT_OVER_OTHER_EXPERTS = 0.15  # on the expert's own domain
MERGED_OVER_BASE = 0.15  # on every domain
MERGED_BELOW_OWN_EXPERT = 0.10  # on each expert's own domain, at most


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # As tests/bench: CI builds the world afresh; PIVOTMERGE_BENCH_CACHE lets a developer reuse worlds already built.
    return Path(os.environ.get("PIVOTMERGE_BENCH_CACHE") or tmp_path_factory.mktemp("worlds"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_example_data_copies_the_small_world_and_a_spec_that_merges_it(tmp_path, cache, run_cli) -> None:
    result = run_cli("make-example", "ex", "--data", "--cache", str(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ex = tmp_path / "ex"
    world = build_world(SMALL, 0, cache)  # read back: the command built it into the cache
    assert world.root.parent == cache
    files = sorted(p.relative_to(world.root) for p in world.root.rglob("*") if p.is_file())
    assert Path("expert_dots/model.safetensors") in files and Path("data/calib/quadrants/data.jsonl") in files
    assert {f: _sha(ex / f) for f in files} == {f: _sha(world.root / f) for f in files}

    spec = yaml.safe_load((ex / "pivotmerge.yaml").read_text())
    root = ex.resolve()
    assert spec == {
        "method": "pivotmerge",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"expert_{d}"),
                    "calibration": {"dataset": str(root / f"data/calib/{d}/data.jsonl")}}
                   for d in DOMAINS],
        "components": ["projector"],
        "evaluate": [{"name": d, "dataset": str(root / f"data/test/{d}/data.jsonl")} for d in DOMAINS],
        "evaluate_inputs": True,
    }
    assert spec_from_dict(spec).parameters == {}  # PivotMerge's defaults: with calibration data, its data mode
    base = load_file(ex / "base" / "model.safetensors")
    for d in DOMAINS:
        expert = load_file(ex / f"expert_{d}" / "model.safetensors")
        changed = {n for n in base if not (expert[n] == base[n]).all()}
        assert changed == {n for n in base if n.startswith("model.multi_modal_projector.")}, d
        assert f"expert:  {root / f'expert_{d}'}" in result.stdout
    assert f"next:    pivotmerge merge {root / 'pivotmerge.yaml'} -o merged" in result.stdout


def test_make_example_data_refuses_the_random_examples_options(tmp_path, run_cli) -> None:
    for option in (["--experts", "2"], ["--size", "small"], ["--lm-experts"]):
        result = run_cli("make-example", "ex", "--data", *option, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"error: {option[0]}: does not apply with --data (the trained example "
                                         f"has one expert per domain: {', '.join(DOMAINS)})")
    assert not (tmp_path / "ex").exists()


def test_quickstart_merges_trained_experts_through_the_service_and_compares_them(tmp_path, cache) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env["COLUMNS"] = "160"
    result = subprocess.run([sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "quickstart",
                             "--dir", str(tmp_path), "--cache", str(cache)], env=env, capture_output=True, text=True,
                            timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Submitted a pivotmerge merge of the experts' projectors" in out and "POST /v1/merges -> 202" in out
    assert "100%" in out and "succeeded" in out

    merged = tmp_path / "merged"
    assert LlavaForConditionalGeneration.from_pretrained(merged) is not None
    # Embedded means SQLite: the job, its metrics and its artifact records are in data_dir's database.
    with sqlite3.connect(tmp_path / "service" / "pivotmerge.db") as db:
        (job_id, state, kind, metrics), = db.execute("SELECT id, state, kind, metrics FROM jobs").fetchall()
        records = dict(db.execute("SELECT name, sha256 FROM artifacts").fetchall())
    assert (state, kind) == ("succeeded", "merge")
    assert f"http://127.0.0.1:8000/ui/merges/{uuid.UUID(job_id)}" in out  # the dashboard's page of the job
    assert records == {p.name: file_sha256(p) for p in merged.iterdir()}
    assert (tmp_path / "service" / "broker.db").exists()  # the broker needed no server
    assert processes_with_env(f"PIVOTMERGE_DATA_DIR={tmp_path / 'service'}") == []  # API and worker have exited

    # The last table: the job's metrics, one row per model, one column per domain, then the mean.
    table = out[out.index("Token accuracy on each domain's test split"):]
    assert "Each expert knows its own domain" in table
    accuracy = {label: {m["dataset"]: m["token_accuracy"] for m in rows} for label, rows in json.loads(metrics).items()}
    models = tmp_path / "service" / "models" / "example"
    names = {"merged": "merged", "base": "base", **{str(models / f"expert_{d}"): f"expert_{d}" for d in DOMAINS}}
    assert set(accuracy) == set(names)
    for label, name in names.items():
        cells = [f"{accuracy[label][d]:.3f}" for d in DOMAINS] + [f"{sum(accuracy[label].values()) / len(DOMAINS):.3f}"]
        assert re.search(rf"│ {name} .*│ " + r" .*│ ".join(map(re.escape, cells)), table), (name, cells)
    expert = {d: accuracy[str(models / f"expert_{d}")] for d in DOMAINS}
    for d in DOMAINS:
        assert expert[d][d] >= max(expert[o][d] for o in DOMAINS if o != d) + EXPERT_OVER_OTHER_EXPERTS, d
        assert accuracy["merged"][d] >= accuracy["base"][d] + MERGED_OVER_BASE, d
        assert accuracy["merged"][d] >= expert[d][d] - MERGED_BELOW_OWN_EXPERT, d


def processes_with_env(entry: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found
