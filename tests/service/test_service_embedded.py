"""The embedded default and the admin CLI, as a user runs them."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from click.testing import CliRunner
from transformers import LlavaForConditionalGeneration

from app.cli import admin
from core.storage import file_sha256


def test_quickstart_runs_the_embedded_service_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env["COLUMNS"] = "120"
    result = subprocess.run([sys.executable, "-c", "from pivotmerge.cli.main import main; main()", "quickstart",
                             "--dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Submitted a pivotmerge merge: POST /v1/merges -> 202" in result.stdout
    assert "100%" in result.stdout and "succeeded" in result.stdout

    merged = tmp_path / "merged"
    assert LlavaForConditionalGeneration.from_pretrained(merged) is not None
    # Embedded means SQLite: the job and its artifact records are in data_dir's database.
    with sqlite3.connect(tmp_path / "service" / "pivotmerge.db") as db:
        (job_id, state, kind), = db.execute("SELECT id, state, kind FROM jobs").fetchall()
        records = dict(db.execute("SELECT name, sha256 FROM artifacts").fetchall())
    assert (state, kind) == ("succeeded", "merge")
    assert f"http://127.0.0.1:8000/ui/merges/{uuid.UUID(job_id)}" in result.stdout  # the dashboard's page of the job
    assert records == {p.name: file_sha256(p) for p in merged.iterdir()}
    assert (tmp_path / "service" / "broker.db").exists()  # the broker needed no server
    assert processes_with_env(f"PIVOTMERGE_DATA_DIR={tmp_path / 'service'}") == []  # API and worker have exited


def processes_with_env(entry: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def test_admin_creates_teams_and_keys_that_the_api_accepts(client, settings_values, monkeypatch) -> None:
    for name, value in settings_values.items():
        monkeypatch.setenv(f"PIVOTMERGE_{name.upper()}", value)
    runner = CliRunner()
    created = runner.invoke(admin, ["create-team", "vision-lab-admin-test"])
    assert created.exit_code == 0, created.output
    key = re.search(r"API key: (\S+)", created.output).group(1)
    assert client.get("/v1/merges", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    twice = runner.invoke(admin, ["create-team", "vision-lab-admin-test"])
    assert twice.exit_code == 1 and "already exists" in twice.output

    key_id = re.search(r"key id (\S+)", created.output).group(1)
    assert runner.invoke(admin, ["revoke-key", key_id]).exit_code == 0
    assert client.get("/v1/merges", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    listing = runner.invoke(admin, ["list-teams"]).output
    assert "vision-lab-admin-test" in listing and "revoked" in listing and key not in listing
