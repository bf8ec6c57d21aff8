"""Tests that need a system package (a server, a browser) skip without it, in one line naming what to
install; with PIVOTMERGE_REQUIRE_ALL=1 (as .ci/run sets) such a test fails instead, so CI runs them all."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ALL = os.environ.get("PIVOTMERGE_REQUIRE_ALL") == "1"


def missing(what: str) -> NoReturn:
    message = f"needs {what}"
    if REQUIRE_ALL:
        pytest.fail(f"{message}; PIVOTMERGE_REQUIRE_ALL=1 runs every test", pytrace=False)
    pytest.skip(message)
