"""Fixtures for the dashboard: the real service (Postgres, Redis, a Celery worker) served by
uvicorn on a loopback port, and headless Chromium driven by Selenium.

The browser is Debian's `chromium` with its `chromedriver`; the driver path is given
explicitly, so Selenium Manager never runs and nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from app.main import create_app
from service_core.settings import Settings
from pivotmerge.data.example import ExampleSet, make_example
from tests.service.conftest import (  # noqa: F401  (fixtures used by name)
    _new_team, broker_prefix, database_url, pg_admin_url, redis_url, service_dir, sessions, settings, settings_values,
    worker,
)
from tests.system_packages import missing

CHROMIUM = Path(os.environ.get("PIVOTMERGE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PIVOTMERGE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
WIDE = (1280, 800)
NARROW = (420, 800)


@pytest.fixture(scope="session")
def server(settings: Settings) -> Iterator[str]:
    """The API, with its dashboard, on a free loopback port: what a browser talks to."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(settings), log_level="warning", timeout_graceful_shutdown=2)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with httpx.Client(base_url=url) as probe:
        for _ in range(200):
            if instance.started:
                break
            threading.Event().wait(0.05)
        assert probe.get("/healthz").status_code == 200
    yield url
    instance.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="session")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


@pytest.fixture(scope="session")
def unread_queue(settings: Settings, broker_prefix: str) -> Iterator[TestClient]:
    """The same database, a deployment (broker key prefix) without workers: its jobs stay waiting."""
    alone = settings.model_copy(update={"broker_key_prefix": f"{broker_prefix.rstrip(':')}-ui-unread:"})
    with TestClient(create_app(alone)) as client:
        yield client


@pytest.fixture(scope="session")
def example(settings: Settings) -> ExampleSet:
    """Base, two experts and three tiny datasets under the allowed root."""
    return make_example(settings.allowed_roots[0] / "ui", n_experts=2, with_data=True, n_samples=4)


@pytest.fixture
def team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _new_team(sessions, "ui")


@pytest.fixture
def other_team(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return _new_team(sessions, "ui-other")


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each page's screenshots go; PIVOTMERGE_UI_SCREENSHOTS keeps them somewhere lasting."""
    folder = os.environ.get("PIVOTMERGE_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def chromium(downloads: Path) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        missing(f"{CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={WIDE[0]},{WIDE[1]}", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium: webdriver.Chrome, server: str) -> Iterator[webdriver.Chrome]:
    """The session's browser, signed out, at the wide size; the test fails on a script error or a CSP refusal."""
    chromium.set_window_size(*WIDE)
    chromium.get(f"{server}/ui/sign-in")
    chromium.execute_script("sessionStorage.clear()")
    chromium.get_log("browser")  # drop what came before this test
    yield chromium
    # The API's 4xx answers a test provokes are logged as failed loads; anything else is a fault of a page.
    errors = [e["message"] for e in chromium.get_log("browser")
              if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
    assert errors == []


def random_key() -> str:
    return f"ui-{uuid.uuid4().hex}"


def clear(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
