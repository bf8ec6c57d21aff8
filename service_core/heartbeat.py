"""One mechanism for the service's periodic threads: a job's lease keeper, a split part's beat and the
API process's housekeeping (lease reaper, webhook dispatch, retention) are each a `Heartbeat`."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Heartbeat:
    """Calls `beat` every `period` seconds on a daemon thread, until stopped or until `beat` returns False.

    An exception in `beat` is logged and the next beat tries again: the database or the store may be
    away for a moment, and what a beat keeps (a lease) has slack for it.
    """

    def __init__(self, name: str, period: float, beat: Callable[[], object], *, first_now: bool = False) -> None:
        self.name, self.period, self.beat, self.first_now = name, period, beat, first_now
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def wake(self) -> None:
        """Beat now rather than at the end of the period (the job dispatcher, after a submission)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        wait = 0.0 if self.first_now else self.period
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            wait = self.period
            try:
                if self.beat() is False:
                    return
            except Exception:
                log.warning("%s: a beat failed; trying again in %s s", self.name, self.period, exc_info=True)
