"""The commands' progress bar, on stderr so that --json output on stdout stays clean."""

from __future__ import annotations

from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

from pivotmerge.progress import Progress

console = Console(stderr=True)
B = TypeVar("B", bound="LazyBar")


class LazyBar:
    """A rich bar (label, bar, done/total, elapsed, a dim note) that appears only when shown.

    Shown with the first progress report, so a spec refused during the checks
    prints its one error line and no empty bar.
    """

    def __init__(self, label: str) -> None:
        self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[note]}", style="dim"), console=console, transient=False)
        self._task = self._bar.add_task(label, total=None, note="")
        self._shown = False

    def __enter__(self: B) -> B:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            self._bar.stop()

    def _show(self) -> None:
        if not self._shown:
            self._bar.start()
            self._shown = True


class ProgressBar(LazyBar):
    """Fed by the engine's progress callback: tensors done out of the total, the current tensor as the note."""

    def __call__(self, p: Progress) -> None:
        if p.stage == "done":
            return
        self._show()
        self._bar.update(self._task, completed=p.done, total=p.total, note=p.tensor or "")
