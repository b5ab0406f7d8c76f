"""Counting LM calls and tokens across threads, for optimizer diagnostics and reports.

dspy's ``track_usage`` is per context and is lost across worker threads. A counter installed as a dspy callback in
the context (``dspy.context(callbacks=[usage])``) sees every LM call, but dspy then wakes every callback on every
module, predictor, adapter and tool call too (it binds each call's arguments to hand them over), a measurable share of a
compile's client CPU. So counting lives on the LM instead: every LM the package builds carries ``METER``, one
callback that dspy runs for that LM's calls only, and ``counting(...)`` makes counters active for the calls made in
a ``with`` block, in this thread and in worker threads that copy the context (the counters travel in dspy's
context settings, like ``lm`` and ``adapter``). ``counting`` meters the context's LM and any LM passed to it, so LMs
built elsewhere are counted too.

HTTP requests are counted beside calls: the native engine (``lm.attempts``) hands each request it sent, retries and
hedges included, to the counters active where the call was made (``count_request``), with why it brought no answer
when it did not. ``errors`` counts those failed requests, and the failed calls of LMs whose requests are not seen
(LiteLLM's, a custom engine's).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.callback_context import ACTIVE_CALL_ID

ACTIVE_KEY = "persona_dspy_lm_usage"
"""The dspy context setting holding the counters active for the calls of a ``with counting(...)`` block."""
REQUESTS_KEY = "persona_dspy_lm_requests"
"""Where an LM that calls other LMs (a pool of servers) keeps its caller's counters while it hides its inner calls
from them (``ACTIVE_KEY`` empty): their HTTP requests still count there."""
REQUEST_FAILURES = ("http_error", "timeout", "connection", "abandoned")
"""Why a request brought no answer: an HTTP error status, no reply in time, a broken or refused connection, or
abandoned because a copy of it sent later (a hedge) answered first."""
_COUNTED = "_persona_dspy_request_counted"


def _usage_numbers(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a history usage dict or an lm15 Usage object."""
    if usage is None:
        return None
    if isinstance(usage, dict):
        if not usage:
            return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
    else:
        prompt, completion = getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
    if prompt is None and completion is None:
        return None
    return int(prompt or 0), int(completion or 0)


class LMUsage(BaseCallback):
    """Counts LM calls and tokens across threads (dspy's track_usage is per-context; this sees every call).

    Make it active with ``usage.counting()`` (the calls made in the block, by any metered LM), or register it on an
    LM (``callbacks=[usage]``: that LM's calls) or globally; a call seen twice (several places) counts once.
    Tokens come from the call's history entry, matched by identity of the outputs dspy hands to on_lm_end; with
    history disabled, a cache hit, or a server that reports no usage, the call is counted as unmetered. An LM that
    calls other LMs (a router over servers) counts as the calls it makes, each once, not as one more.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._active: dict[str, Any] = {}
        self._delegated: set[str] = set()  # active calls made through inner LM calls (those are what count)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.errors = 0
            self.failed_calls = 0
            self.requests = 0
            self.failed_requests: dict[str, int] = {}
            self.prompt_tokens = 0
            self.completion_tokens = 0
            self.unmetered_calls = 0
            self.by_model: dict[str, int] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        outer = ACTIVE_CALL_ID.get()  # dspy sets it to the enclosing call's id while that call runs
        with self._lock:
            if call_id in self._active:
                return
            if outer in self._active and outer not in self._delegated:  # an LM calling an LM: the inner one counts
                self._delegated.add(outer)
                self._count(self._active[outer], -1)
            self._active[call_id] = instance
            self._count(instance, 1)

    def _count(self, instance: Any, step: int) -> None:
        self.calls += step
        model = str(getattr(instance, "model", "?"))
        self.by_model[model] = self.by_model.get(model, 0) + step
        if not self.by_model[model]:
            del self.by_model[model]

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            instance = self._active.pop(call_id, None)
            if call_id in self._delegated:  # its inner calls recorded their own tokens and errors
                self._delegated.discard(call_id)
                return
        if instance is None:
            return
        numbers = None if exception is not None else self._tokens(instance, outputs)
        with self._lock:
            if exception is not None:
                self.failed_calls += 1
                self.errors += int(not was_counted(exception))  # else its failed requests were counted already
            elif numbers is None:
                self.unmetered_calls += 1
            else:
                self.prompt_tokens += numbers[0]
                self.completion_tokens += numbers[1]

    def on_request(self, failure: str | None) -> None:
        """One HTTP request sent; ``failure`` says why it brought no answer (``REQUEST_FAILURES``), None if it did."""
        with self._lock:
            self.requests += 1
            if failure is not None:
                self.errors += 1
                self.failed_requests[failure] = self.failed_requests.get(failure, 0) + 1

    @staticmethod
    def _tokens(instance: Any, outputs: Any) -> tuple[int, int] | None:
        if hasattr(outputs, "usage"):  # an explicit lm15 Request returns a Response
            return _usage_numbers(outputs.usage)
        recent = (getattr(instance, "history", None) or [])[-64:]  # a slice is a consistent copy under threads
        for entry in reversed(recent):
            if entry.get("outputs") is outputs:
                return _usage_numbers(entry.get("usage"))
        return None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data, for reports."""
        with self._lock:
            return {
                "calls": self.calls,
                "requests": self.requests,
                "errors": self.errors,
                "failed_requests": dict(self.failed_requests),
                "failed_calls": self.failed_calls,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "unmetered_calls": self.unmetered_calls,
                "by_model": dict(self.by_model),
            }

    def counting(self, *lms: Any) -> Any:
        """``with usage.counting(*lms):`` counts the LM calls made in the block (see ``counting``)."""
        return counting(self, lms=lms)


class _Meter(BaseCallback):
    """The one callback an LM carries: hands its calls to the counters active in the caller's context."""

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        for usage in dspy.settings.get(ACTIVE_KEY) or ():
            usage.on_lm_start(call_id, instance, inputs)

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        for usage in dspy.settings.get(ACTIVE_KEY) or ():  # a counter that never saw the start ignores the end
            usage.on_lm_end(call_id, outputs, exception)


METER = _Meter()
"""Put on every LM the package builds (``metered``); it costs nothing when no counter is active."""


def metered(lm: Any) -> Any:
    """``lm`` carrying ``METER`` (added once, in place; ``lm.copy()`` keeps it). Returns ``lm``."""
    callbacks = getattr(lm, "callbacks", None)
    if isinstance(callbacks, list) and not any(c is METER for c in callbacks):
        callbacks.append(METER)
    return lm


@contextmanager
def counting(*usages: BaseCallback, lms: tuple[Any, ...] = ()) -> Iterator[None]:
    """Count, on each of ``usages`` (``LMUsage``, or any callback counting LM calls), the LM calls made in this block
    (and in threads that copy its context).

    Counters already active stay active (nested blocks count into every enclosing counter). The context's LM and
    ``lms`` get ``METER``; an LM that carries neither it nor the counter itself is not seen.
    """
    for lm in (dspy.settings.get("lm"), *lms):
        if lm is not None:
            metered(lm)
    active = tuple(dspy.settings.get(ACTIVE_KEY) or ())
    added = tuple(u for u in dict.fromkeys(usages) if all(u is not a for a in active))
    with dspy.context(**{ACTIVE_KEY: active + added}):
        yield


def active_request_counters() -> tuple[Any, ...]:
    """The counters an HTTP request sent here counts on (see ``REQUESTS_KEY``)."""
    inner = dspy.settings.get(REQUESTS_KEY)
    return tuple(inner if inner is not None else dspy.settings.get(ACTIVE_KEY) or ())


def count_request(counters: tuple[Any, ...] | list[Any], failure: str | None) -> None:
    """Count one HTTP request on each of ``counters`` that counts requests (``LMUsage.on_request``)."""
    for usage in counters:
        on_request = getattr(usage, "on_request", None)
        if on_request is not None:
            on_request(failure)


def mark_counted(exc: BaseException) -> BaseException:
    """Mark an error whose request was counted as failed, so the call it fails is not an error once more."""
    try:
        setattr(exc, _COUNTED, True)
    except AttributeError:
        pass
    return exc


def was_counted(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, was counted as a failed request (``mark_counted``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if getattr(cause, _COUNTED, False):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
