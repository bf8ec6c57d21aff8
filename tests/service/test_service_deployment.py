"""docker-compose.yml and the images: no Docker engine runs here, so check what can be checked."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from service_core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_postgres_redis_migrations_api_and_a_gpu_worker() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= services.keys()
    assert services["migrate"]["command"] == ["pivotmerge", "admin", "migrate"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert env["PIVOTMERGE_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["PIVOTMERGE_DATABASE_URL"]
        assert env["PIVOTMERGE_BROKER_URL"].startswith("redis://redis:")
        settings = Settings(**{k.removeprefix("PIVOTMERGE_").lower(): v for k, v in env.items()})  # values are valid
        assert not settings.embedded
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_names_files_that_exist_and_commands_that_resolve() -> None:
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        context = ROOT / service["build"]["context"]
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in shlex.split(line)[1:-1]:
                    assert (context / source).exists(), f"{dockerfile.name}: COPY {source} missing"
    # Every package the project installs is in both images (the service's shared package once was not).
    packages = {name.rstrip("*") for name in tomllib.loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]}
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        copied = {shlex.split(line)[1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")}
        assert packages <= copied, f"{dockerfile.name}: no COPY of {sorted(packages - copied)}"
    started = set()
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        for found in re.findall(r'"--factory", "([\w.]+):\w+"|"-A", "([\w.]+)"', dockerfile.read_text()):
            started.add(next(m for m in found if m))
    assert started == {"app.main", "workers.worker"}
    for module in started:
        importlib.import_module(module)
