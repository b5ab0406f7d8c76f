"""Per-user work on a thread pool that can be stopped: by a failure limit, or by Ctrl-C/SIGTERM with a grace period.

``eval`` and ``compile`` hand users to workers one at a time (never more than ``workers`` in flight), so a stop
takes effect at once: nothing new starts. After ``stop`` the users in flight finish (a failure limit: their results
are wanted); after ``interrupt`` they get ``grace`` seconds, then are abandoned: their threads keep running until
their LM call returns, but nobody waits for them and nothing of theirs is recorded. Each result is handed to
``on_result`` in the caller's thread as soon as it exists, so whatever completed is kept.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from persona_dspy.console import plural

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

INTERRUPT_GRACE = 2.0
"""Seconds users in flight get to finish after Ctrl-C or SIGTERM before they are abandoned (then their requests are
cancelled: a command ends within seconds of the signal)."""


@dataclass
class RunOutcome(Generic[T]):
    """What did not complete: users never started, users abandoned mid-run; ``interrupted`` by a signal."""

    not_started: list[T] = field(default_factory=list)
    abandoned: list[T] = field(default_factory=list)
    interrupted: bool = False


def run_users(items: Iterable[T], work: Callable[[T], R], on_result: Callable[[T, R], None], *, workers: int,
              stop: threading.Event | None = None, interrupt: threading.Event | None = None,
              grace: float = INTERRUPT_GRACE, name: str = "persona-users") -> RunOutcome[T]:
    """Run ``work(item)`` for every item on ``workers`` threads (each in a copy of the caller's context)."""
    stop = stop or threading.Event()
    interrupt = interrupt or threading.Event()
    queue = list(items)
    outcome: RunOutcome[T] = RunOutcome()
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(queue) or 1)), thread_name_prefix=name)
    running: dict[Future, T] = {}
    deadline: float | None = None
    try:
        while True:
            while queue and len(running) < workers and not (stop.is_set() or interrupt.is_set()):
                item = queue.pop(0)
                running[pool.submit(contextvars.copy_context().run, work, item)] = item
            if not running:
                break
            done, _ = wait(running, timeout=0.1, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(running.pop(future), future.result())
            if interrupt.is_set():
                if deadline is None:
                    deadline = time.monotonic() + grace
                    logger.warning("interrupted: starting no new users; waiting up to %.0f s for %s in flight",
                                   grace, plural(len(running), "user"))
                if running and time.monotonic() >= deadline:
                    outcome.abandoned = list(running.values())
                    logger.warning("abandoned %s still running after %.0f s", plural(len(running), "user"), grace)
                    break
    finally:
        pool.shutdown(wait=not outcome.abandoned, cancel_futures=True)
    outcome.not_started = queue
    outcome.interrupted = interrupt.is_set()
    return outcome
