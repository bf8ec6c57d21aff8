"""Fixtures every test package may use."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the CLI in-process, as `main` does for the console script."""
    from pivotmerge.cli.main import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run
