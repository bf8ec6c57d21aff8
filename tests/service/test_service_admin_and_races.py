"""A cancel that raced with completion, and the admin CLI's bad input and fresh installs."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import update

from app.auth import create_team
from app.errors import ApiError
from workers.kinds.merge import MERGE as MERGES
from app import job_service as jobs
from service_core.models import Job, JobState


def test_a_cancel_that_lost_the_race_names_the_state_the_job_ended_in(sessions) -> None:
    with sessions() as session:
        team = create_team(session, f"race-{uuid.uuid4().hex[:8]}")
        job = Job(team_id=team.id, kind="merge", spec={}, request_sha256="0" * 64, state=JobState.running)
        session.add(job)
        session.commit()
        loaded = jobs.load_job(session, team, MERGES, job.id)  # the API has read it as running...
        with sessions() as worker:  # ...and the worker finishes before the cancel's UPDATE
            worker.execute(update(Job).where(Job.id == job.id).values(state=JobState.succeeded))
            worker.commit()
        with pytest.raises(ApiError) as refused:
            jobs.cancel_job(MERGES, session, loaded)
    assert refused.value.status == 409
    assert refused.value.detail == f"merge {job.id} has already succeeded; only waiting, queued or running jobs can be cancelled"


def pivotmerge_cli(args: list[str | bytes], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pivotmerge", *args], env=env, capture_output=True, text=True, errors="replace", timeout=120)


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIVOTMERGE_")}
    env.update({f"PIVOTMERGE_{k.upper()}": v for k, v in settings.items()})
    return env


def test_create_team_on_a_fresh_embedded_install_migrates_first(tmp_path: Path) -> None:
    result = pivotmerge_cli(["admin", "create-team", "vision-lab"], clean_env(data_dir=str(tmp_path / "fresh")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("team vision-lab (") and "API key: pm_" in result.stdout


@pytest.mark.parametrize("name,words", [("x" * 101, "1 to 100 characters, got 101"), (b"lab\xff", "not printable UTF-8"),
                                        ("", "1 to 100 characters, got 0")])
def test_create_team_with_a_bad_name_is_one_line_exit_2(tmp_path: Path, name: str | bytes, words: str) -> None:
    result = pivotmerge_cli(["admin", "create-team", name], clean_env(data_dir=str(tmp_path / "d")))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.stderr


def test_admin_on_an_unmigrated_deployment_database_says_what_to_run(pg_admin_url: str) -> None:
    name = f"pivotmerge_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
        result = pivotmerge_cli(["admin", "create-team", "lab"], clean_env(database_url=url))
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: the database has no schema yet: run `pivotmerge admin migrate` first"
