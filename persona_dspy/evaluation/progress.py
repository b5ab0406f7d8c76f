"""The status line of a run of users: each user in flight with their current step, tokens/s and an ETA.

On a CPU model one user takes minutes, so a per-user bar alone sits still. ``RunProgress`` counts the run's LM calls
(an ``LMUsage`` made active for the run with ``counting``) and names the step each call serves from the signature of
the predictor making it: ``summary`` (the initial persona), ``loss`` (textual feedback), ``update`` (a new persona),
else ``answer``; consecutive calls of one step are numbered (``answer 2/3``, out of the answers one pass needs). The
line shows generated tokens per second of wall time and an ETA: the calls still expected (per user: the mean of
the finished users, before the first one an upper bound from the settings) times the measured seconds per call. A
ticker thread refreshes the bar each second, so its elapsed time moves while a call runs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import dspy

from persona_dspy.lm.usage import LMUsage
from persona_dspy.signatures.persona import PersonaSummary, PersonaUpdate, TextualLoss

_STEPS = ((PersonaSummary, "summary"), (TextualLoss, "loss"), (PersonaUpdate, "update"))


def step_of(signature: Any) -> str:
    """``summary``, ``loss`` or ``update`` for the aligner's signatures (by their fields: instructions may be
    rewritten), else ``answer``."""
    fields = (set(getattr(signature, "input_fields", {}) or {}), set(getattr(signature, "output_fields", {}) or {}))
    for known, step in _STEPS:
        if fields == (set(known.input_fields), set(known.output_fields)):
            return step
    return "answer"


def current_step() -> str:
    """The step of the LM call being made in this thread (its innermost predictor's signature)."""
    for module in reversed(dspy.settings.caller_modules or []):
        signature = getattr(module, "signature", None)
        if signature is not None:
            return step_of(signature)
    return "answer"


@dataclass
class _User:
    user_id: str
    started: float
    per_pass: dict[str, int]
    step: str = "starting"
    in_step: int = 0
    calls: int = 0

    def label(self) -> str:
        total = self.per_pass.get(self.step)
        count = f" {self.in_step}/{total}" if total else (f" {self.in_step}" if self.in_step > 1 else "")
        return f"{self.user_id[:10]}: {self.step}{count}"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RunProgress(LMUsage):
    """Counts a run's LM calls and shows, on ``bar`` (tqdm), each user's step, tokens/s and an ETA.

    ``per_pass``: calls one step makes in a row (answers: the validation slice; losses: the batch);
    ``calls_bound``: an upper bound of one user's calls, for the ETA before a user finished.
    """

    def __init__(self, bar: Any, *, users: int, workers: int, per_pass: dict[str, int], calls_bound: int) -> None:
        super().__init__()
        self.bar, self.users, self.workers = bar, users, max(1, workers)
        self.per_pass, self.calls_bound = per_pass, calls_bound
        self.started = time.monotonic()
        self._users: dict[int, _User] = {}  # by thread
        self._finished_calls: list[int] = []
        self._call_seconds: list[float] = []
        self._call_started: dict[str, float] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.note = ""
        """Shown at the end of the line (e.g. users failed so far)."""

    # -- the run tells it ----------------------------------------------------------------------------
    def start_user(self, user_id: str, **per_pass: int) -> None:
        """Called in the worker thread that runs ``user_id``; ``per_pass`` overrides the run's for this user."""
        with self._lock:
            self._users[threading.get_ident()] = _User(user_id, time.monotonic(), {**self.per_pass, **per_pass})
        self.refresh()

    def finish_user(self) -> None:
        """Called in the same thread once the user's result exists (skipped users made no call)."""
        with self._lock:
            user = self._users.pop(threading.get_ident(), None)
            if user is not None and user.calls:
                self._finished_calls.append(user.calls)
        self.refresh()

    # -- LM calls (dspy callbacks, in the calling thread) ------------------------------------------------
    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        with self._lock:
            seen = call_id in self._active
        super().on_lm_start(call_id, instance, inputs)
        if seen:
            return
        step = current_step()
        with self._lock:
            self._call_started[call_id] = time.monotonic()
            user = self._users.get(threading.get_ident())
            if user is not None:
                user.in_step = user.in_step + 1 if user.step == step else 1
                user.step, user.calls = step, user.calls + 1
        self.refresh()

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        super().on_lm_end(call_id, outputs, exception)
        with self._lock:
            began = self._call_started.pop(call_id, None)
            if began is not None and exception is None:
                self._call_seconds.append(time.monotonic() - began)
        self.refresh()

    # -- the line -----------------------------------------------------------------------------------
    def eta_seconds(self, users_done: int) -> float | None:
        """Seconds left: calls still expected x measured seconds per call / calls in parallel; None before a call."""
        with self._lock:
            if not self._call_seconds:
                return None
            per_call = sum(self._call_seconds[-20:]) / len(self._call_seconds[-20:])
            per_user = (sum(self._finished_calls) / len(self._finished_calls) if self._finished_calls
                        else self.calls_bound)
            in_flight = sum(max(per_user - u.calls, 0) for u in self._users.values())
            waiting = max(self.users - users_done - len(self._users), 0) * per_user
        return (in_flight + waiting) * per_call / min(self.workers, max(self.users - users_done, 1))

    def line(self, users_done: int) -> str:
        elapsed = time.monotonic() - self.started
        with self._lock:
            steps = [u.label() for u in self._users.values()]
            tokens = self.completion_tokens
        eta = self.eta_seconds(users_done)
        parts = [*steps, f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 else "",
                 f"ETA ~{_clock(eta)}" if eta is not None else "ETA after the first call", self.note]
        return " | ".join(part for part in parts if part)

    def refresh(self) -> None:
        if getattr(self.bar, "disable", False):
            return
        self.bar.set_postfix_str(self.line(int(self.bar.n)), refresh=True)

    def __enter__(self) -> RunProgress:
        if not getattr(self.bar, "disable", False):
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.refresh()
