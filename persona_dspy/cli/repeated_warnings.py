"""Warnings that repeat are counted, not repeated: the first of each kind is shown, the rest are summed at the end.

A compile on a small model can log the same warning hundreds of times (``LM response was truncated...``, ``update
output rejected ...``), burying the progress line and the summary. Without ``-v`` a ``RepeatedWarnings`` filter on
the log handler lets the first warning of each kind through (a kind: the logger and the message before its
arguments), drops the others and counts them; ``summary()`` is the closing line the CLI prints. With ``-v`` every
warning is shown as before. The counts of what the model did wrong (truncations, rejected outputs by step) are in
the command's own summary as well.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

NOTE = " (further warnings like this one are counted, not shown; -v shows each)"


class RepeatedWarnings(logging.Filter):
    """Lets the first warning of each kind through and counts the repeats (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.seen: Counter[tuple[str, str]] = Counter()
        self.shown: dict[tuple[str, str], str] = {}  # the first of each kind, as it was shown
        self.handlers: list[logging.Handler] = []

    def remove(self) -> None:
        """Take the filter off the handlers it was put on (dspy's handler outlives a command run in-process)."""
        for handler in self.handlers:
            handler.removeFilter(self)
        self.handlers = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        if getattr(record, "_persona_dspy_counted", None) is not None:  # a handler further up saw it already
            return record._persona_dspy_counted
        record._persona_dspy_counted = self._first(record)
        return record._persona_dspy_counted

    def _first(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        with self._lock:
            self.seen[key] += 1
            first = self.seen[key] == 1
        if first:
            self.shown[key] = record.getMessage()
            if isinstance(record.msg, str):
                record.msg = record.msg + NOTE.replace("%", "%%")
        return first

    def summary(self) -> str | None:
        """One line naming each repeated warning and how many repeats were not shown; None if none repeated."""
        with self._lock:
            repeated = [(self.shown.get(key, key[1]), n - 1) for key, n in self.seen.items() if n > 1]
        if not repeated:
            return None
        kinds = "; ".join(f"{_short(message)!r} {n} more time{'s' if n > 1 else ''}" for message, n in repeated)
        return f"persona-dspy: repeated warnings not shown (-v shows each): {kinds}"


def _short(message: str, limit: int = 80) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


_ACTIVE: list[RepeatedWarnings] = []
"""The filter of the command running now (``install``), for ``cover_dspy`` once dspy has set up its handler."""
LOGGERS = ("", "dspy")
"""The loggers whose terminal handlers print warnings: the root (``logging.basicConfig``) and dspy's own (it does
not propagate)."""


def _cover(counter: RepeatedWarnings) -> None:
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and counter not in handler.filters:
                handler.addFilter(counter)
                counter.handlers.append(handler)


def install(verbose: int, quiet: bool) -> RepeatedWarnings | None:
    """Put the filter on the terminal handlers (``LOGGERS``) unless ``-v`` (each warning shown) or ``-q`` (none
    shown); handlers of other kinds (a test's log capture) still see every record."""
    if verbose or quiet:
        return None
    counter = RepeatedWarnings()
    _cover(counter)
    _ACTIVE[:] = [counter]
    return counter


def cover_dspy() -> None:
    """dspy adds its handler when it is first imported, after ``install``: the command calls this once it has."""
    for counter in _ACTIVE:
        _cover(counter)
