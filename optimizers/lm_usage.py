"""Counting LM calls and tokens across threads, for optimizer diagnostics and reports.

dspy's ``track_usage`` is per context and is lost across worker threads; a callback sees every call.
"""

from __future__ import annotations

import threading
from typing import Any

from dspy.utils.callback import BaseCallback


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

    Register it on the LM (``callbacks=[usage]``) or globally; a call seen twice (both places) counts once.
    Tokens come from the call's history entry, matched by identity of the outputs dspy hands to on_lm_end; with
    history disabled, a cache hit, or a server that reports no usage, the call is counted as unmetered.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._active: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.errors = 0
            self.prompt_tokens = 0
            self.completion_tokens = 0
            self.unmetered_calls = 0
            self.by_model: dict[str, int] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        with self._lock:
            if call_id in self._active:
                return
            self._active[call_id] = instance
            self.calls += 1
            model = str(getattr(instance, "model", "?"))
            self.by_model[model] = self.by_model.get(model, 0) + 1

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:
            instance = self._active.pop(call_id, None)
        if instance is None:
            return
        numbers = None if exception is not None else self._tokens(instance, outputs)
        with self._lock:
            if exception is not None:
                self.errors += 1
            elif numbers is None:
                self.unmetered_calls += 1
            else:
                self.prompt_tokens += numbers[0]
                self.completion_tokens += numbers[1]

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
                "errors": self.errors,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "unmetered_calls": self.unmetered_calls,
                "by_model": dict(self.by_model),
            }
