"""What every task of a worker process shares: its settings, database and artifact store, the name it
records as a job's or a part's worker, and what a job's task lends the code that runs the job."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from core.storage import ArtifactStore, make_store
from pivotmerge.progress import Progress


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    pid: int


_context: WorkerContext | None = None


def context() -> WorkerContext:
    """Settings, database and store of this process; rebuilt in a forked child, which must not share connections."""
    global _context
    if _context is None or _context.pid != os.getpid():
        settings = Settings()
        _context = WorkerContext(settings, make_sessionmaker(make_engine(settings.database_url)),
                                 make_store(settings), os.getpid())
    return _context


def worker_name(hostname: str) -> str:
    """"node@host:pid": the process to look at (or kill) when a job or a part misbehaves."""
    return f"{hostname}:{os.getpid()}"


def dead_local_owner(worker: str | None) -> str | None:
    """`worker` ("node@host:pid") if it names a process of this host that no longer exists.

    A pool child killed mid-task is redelivered at once, while its lease still
    runs: this lets the new delivery take over without waiting for the lease.
    """
    if not worker or ":" not in worker:
        return None
    node, _, pid = worker.rpartition(":")
    if node.rpartition("@")[2] != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return worker
    except PermissionError:  # alive, someone else's
        return None
    return None


class JobHooks(Protocol):
    """What a job's task lends the code running the job (workers.tasks.JobReporter): the attempt's row,
    progress, the cancel check and events."""

    sessions: sessionmaker[Session]
    job_id: uuid.UUID
    attempt: int

    def progress(self, p: Progress) -> None: ...

    def should_cancel(self) -> bool: ...

    def event(self, type: str, data: dict[str, Any]) -> None: ...
