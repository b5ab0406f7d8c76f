"""Ctrl-C and SIGTERM: the first stops a run of users gracefully, the second exits at once.

The exit code says which signal came: 130 (128 + SIGINT) for Ctrl-C, 143 (128 + SIGTERM) for SIGTERM, as shells
report a process those signals ended."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any


class _Interrupts:
    """Ctrl-C and SIGTERM: the first stops the run gracefully (or raises KeyboardInterrupt outside a run of users),
    the second exits at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signals = 0
        self.first: int | None = None
        self._graceful = False

    @property
    def exit_code(self) -> int:
        """128 + the first signal's number (130 for Ctrl-C, 143 for SIGTERM); 130 when none came."""
        return 128 + (self.first or signal.SIGINT)

    def handle(self, signum: int, frame: Any) -> None:
        self.signals += 1
        self.first = self.first or signum
        if self.signals > 1:
            sys.stderr.write("\npersona-dspy: stopped at once\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        if not self._graceful:
            raise KeyboardInterrupt
        self.event.set()
        sys.stderr.write("\npersona-dspy: stopping: no new users start, those in flight get a few seconds; the "
                         "results so far are written (Ctrl-C again quits at once)\n")
        sys.stderr.flush()

    @contextlib.contextmanager
    def graceful(self):
        """Within: a signal sets the event the run of users watches, instead of raising."""
        self._graceful = True
        try:
            yield self.event
        finally:
            self._graceful = False

    @contextlib.contextmanager
    def installed(self):
        self.event.clear()
        self.signals = 0
        self.first = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


INTERRUPTS = _Interrupts()
