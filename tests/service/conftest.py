"""Fixtures for the service: a fresh Postgres database, Redis, a real Celery worker.

Nothing is mocked. The database `pivotmerge_test_<random>` is created for the
session and dropped at the end; the broker uses its own Redis key prefix, so
parallel sessions on one Redis do not see each other's jobs. The servers are
PIVOTMERGE_TEST_PG's (a URL whose user may create databases) and
PIVOTMERGE_TEST_REDIS's, or else throwaway ones this process starts
(tests/throwaway_servers.py); without their binaries the tests that need them skip.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from redis.exceptions import RedisError

from app.auth import create_api_key, create_team
from service_core.db import make_engine, make_sessionmaker
from app.main import create_app
from service_core.settings import Settings
from pivotmerge.data.example import ExampleSet, make_example
from tests.system_packages import missing
from tests.throwaway_servers import Missing, server_url
from tests.service.service_support import WorkerProcess, merge_spec, migrated_database, service_env, wait_final

MAX_ATTEMPTS = 2
PREFIX_ROOT = f"pmtest-{uuid.uuid4().hex[:8]}"


def _server(variable: str) -> str:
    try:
        return server_url(variable)
    except Missing as absent:
        missing(str(absent))


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A Postgres URL whose user may create databases."""
    url = _server("PIVOTMERGE_TEST_PG")
    try:
        psycopg.connect(url, connect_timeout=10).close()
    except psycopg.OperationalError as error:
        pytest.fail(f"PIVOTMERGE_TEST_PG={url}: cannot connect: {str(error).strip().splitlines()[0]}", pytrace=False)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _server("PIVOTMERGE_TEST_REDIS")
    try:
        Redis.from_url(url, socket_connect_timeout=10).ping()
    except RedisError as error:
        pytest.fail(f"PIVOTMERGE_TEST_REDIS={url}: {error}", pytrace=False)
    return url


@pytest.fixture(scope="session")
def database_url(pg_admin_url: str) -> Iterator[str]:
    with migrated_database(pg_admin_url, "pivotmerge_test_") as url:
        yield url


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def broker_prefix(redis_url: str) -> Iterator[str]:
    """This session's Redis key prefix; set up first, so torn down after every worker and client."""
    yield f"{PREFIX_ROOT}:"
    redis = Redis.from_url(redis_url)
    for key in redis.scan_iter(f"{PREFIX_ROOT}*"):
        redis.delete(key)


@pytest.fixture(scope="session")
def settings_values(broker_prefix: str, redis_url: str, database_url: str, service_dir: Path) -> dict[str, str]:
    """PIVOTMERGE_* settings shared by the in-process API and the worker process."""
    (service_dir / "models").mkdir()
    return {
        "database_url": database_url,
        "broker_url": redis_url,
        "split_broker_url": redis_url,
        "split_backend_url": redis_url,
        "broker_key_prefix": broker_prefix,
        "data_dir": str(service_dir / "data"),
        "allowed_roots": str(service_dir / "models"),
        "max_attempts": str(MAX_ATTEMPTS),
        "max_active_jobs_per_team": "50",
    }


@pytest.fixture(scope="session")
def settings(settings_values: dict[str, str]) -> Settings:
    return Settings(**settings_values)


@pytest.fixture(scope="session")
def sessions(settings: Settings):  # type: ignore[no-untyped-def]
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def queue_only_client(settings: Settings) -> Iterator[TestClient]:
    """An API whose jobs no dispatcher sends (a deployment of its own, without housekeeping): they stay waiting,
    whatever the test needs. Its teams' queues hold 3 waiting jobs."""
    alone = settings.model_copy(update={"broker_key_prefix": f"{PREFIX_ROOT}-unread:", "max_waiting_jobs_per_team": 3,
                                        "housekeeping": False})
    with TestClient(create_app(alone)) as client:
        yield client


def _new_team(sessions, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        team = create_team(session, f"{name}-{uuid.uuid4().hex[:8]}")
        _, key = create_api_key(session, team)
        session.commit()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Auth headers of a fresh team."""
    return _new_team(sessions, "team")


@pytest.fixture
def other_team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _new_team(sessions, "other")


@pytest.fixture(scope="session")
def tiny(settings: Settings) -> ExampleSet:
    """A tiny base + 2 experts under the allowed root: merges in a fraction of a second."""
    return make_example(settings.allowed_roots[0] / "tiny", n_experts=2)


@pytest.fixture(scope="session")
def worker(settings_values: dict[str, str], service_dir: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(service_env(settings_values), service_dir / "worker.log", f"pmtest-{uuid.uuid4().hex[:6]}")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def finished(client, sessions, tiny, worker) -> tuple[dict[str, str], dict]:  # type: ignore[no-untyped-def]
    """A team and its succeeded merge."""
    headers = _new_team(sessions, "owner")
    job = client.post("/v1/merges", json=merge_spec(tiny), headers=headers).json()
    assert wait_final(client, f"/v1/merges/{job['id']}", headers)["state"] == "succeeded"
    return headers, job


@pytest.fixture(scope="session")
def schema_team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _new_team(sessions, "schemathesis")


@pytest.fixture(scope="session")
def api_schema(client: TestClient):  # type: ignore[no-untyped-def]
    import schemathesis

    return schemathesis.openapi.from_asgi("/openapi.json", client.app)
