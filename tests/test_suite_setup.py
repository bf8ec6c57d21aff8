"""The suite's own set-up: a default run leaves the slow tests out and says how to include them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOW_FILE = "tests/service/test_service_faults.py"  # one test, marked slow


def collect(*options: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", SLOW_FILE,
                           *options], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done.stdout


def test_a_default_run_leaves_out_slow_tests_and_says_how_to_include_them() -> None:
    default = collect()
    assert "no tests collected (1 deselected)" in default
    assert "1 slow test left out; run them too with --run-slow" in default
    assert "1 test collected" in collect("--run-slow")
