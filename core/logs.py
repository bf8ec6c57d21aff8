"""Structured logs of the API and the workers: one JSON object a line, carrying what the line is about.

The request id (API), job id, team and attempt are context variables: the API's request middleware and
the worker's job task set them, and every line logged meanwhile, by any logger, carries them. With
PIVOTMERGE_LOG_FORMAT=text the lines are plain text with the same fields at the end.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)
team: ContextVar[str | None] = ContextVar("team", default=None)
attempt: ContextVar[int | None] = ContextVar("attempt", default=None)
CONTEXT = {"request_id": request_id, "job_id": job_id, "team": team, "attempt": attempt}
# Attributes every LogRecord has; anything else given with `extra=` is a field of the line.
_RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def bind_job(job: object, team_id: object, attempt_number: int | None) -> None:
    """What the lines a worker logs from now on are about (until the next job)."""
    job_id.set(str(job))
    team.set(None if team_id is None else str(team_id))
    attempt.set(attempt_number)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    context = {name: var.get() for name, var in CONTEXT.items() if var.get() is not None}
    extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}
    return {**context, **extra}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage(), **fields(record)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in fields(record).items())
        return f"{text} [{extra}]" if extra else text


def configure_logging(log_format: str, level: str) -> None:
    """The root logger writes to stderr in `log_format`; once per process, whoever calls first."""
    root = logging.getLogger()
    if any(getattr(h, "pivotmerge", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.pivotmerge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
