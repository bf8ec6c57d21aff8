"""Progress reports and the cancel check: the engine's only link to whoever listens."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Progress:
    stage: str  # "check", "calibrate", "merge", "refit", "write", "evaluate", "analyze", "done"
    done: int
    total: int
    tensor: str | None = None
    layer: int | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]
