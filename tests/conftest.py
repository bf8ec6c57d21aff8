"""Fixtures every test package may use, and the default run's leaving out of slow tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SLOW = "slow"
_left_out = pytest.StashKey[int]()  # how many slow tests this run left out


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (left out by default; .ci/run runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the slow tests unless asked for them, by --run-slow or by a -m expression."""
    if config.getoption("--run-slow") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker(SLOW)]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker(SLOW)]
        config.hook.pytest_deselected(items=slow)
        config.stash[_left_out] = len(slow)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    left_out = config.stash.get(_left_out, 0)
    if left_out:
        tests = "test" if left_out == 1 else "tests"
        terminalreporter.write_line(f"{left_out} slow {tests} left out; run them too with --run-slow "
                                    "(or only them with -m slow)")


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
