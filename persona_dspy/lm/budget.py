"""Prompts that fit the model's context: ask the server its size, shorten what is retrieved, name the sizes.

The context size is asked once per server (llama.cpp ``/props``, vLLM ``/v1/models``, or ``--context-tokens``).
Tokens are estimated at ``CHARS_PER_TOKEN`` characters each, an over-count for English, so an estimate that fits
really fits. ``fit_passages`` drops the least relevant passages first, then shortens the longest; ``fit_lines`` drops
a history's oldest lines first; a prompt whose fixed part cannot fit raises ``PromptTooLong`` naming the sizes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3
FORMAT_TOKENS = 400
MIN_PASSAGE_TOKENS = 48
PROBE_TIMEOUT = 5.0
ORDER = "least relevant passages dropped first, then the longest shortened"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_lock = threading.Lock()
_windows: dict[str, int | None] = {}
_declared: dict[str, int] = {}


class PromptTooLong(ValueError):
    """A prompt that cannot fit the model's context even with nothing retrieved in it."""

    def __init__(self, needed: int, window: int, reserve: int, what: str = "the prompt") -> None:
        self.needed, self.window, self.reserve, self.what = needed, window, reserve, what
        super().__init__(self.describe())

    def describe(self) -> str:
        return (f"{self.what} needs about {self.needed} tokens plus {self.reserve} for the reply, more than the "
                f"model's context of {self.window} tokens (a larger --server-context / server context, or a "
                f"smaller --max-tokens)")


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def declare_context(api_base: str | None, tokens: int) -> None:
    """The context size of a server that cannot be asked (``--context-tokens``); ``None``: every server."""
    with _lock:
        _declared[(api_base or "*").rstrip("/")] = tokens


def get_json(url: str) -> Any:
    """A server's JSON at ``url``, asked directly (no proxy), within ``PROBE_TIMEOUT``."""
    with _DIRECT.open(url, timeout=PROBE_TIMEOUT) as response:
        return json.loads(response.read())


def ask_server(api_base: str) -> int | None:
    """The context size the server reports (llama.cpp /props, vLLM /v1/models), or None."""
    parts = urlsplit(api_base.rstrip("/"))
    root = urlunsplit((parts.scheme, parts.netloc, re.sub(r"/v1$", "", parts.path), "", ""))
    try:
        props = get_json(f"{root}/props")
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx") or props.get("n_ctx")
        if n_ctx:
            return int(n_ctx)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        models = get_json(f"{api_base.rstrip('/')}/models")
        lengths = [int(m["max_model_len"]) for m in models.get("data", []) if m.get("max_model_len")]
        if lengths:
            return min(lengths)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def context_window(lm: Any) -> int | None:
    """The context size in tokens for this LM's server: declared, else asked once, else None (unknown)."""
    kwargs = getattr(lm, "kwargs", None) or {}
    api_base = (kwargs.get("api_base") or kwargs.get("base_url") or "").rstrip("/")
    with _lock:
        declared = _declared.get(api_base) or _declared.get("*")
        if declared:
            return declared
        if not api_base:
            return None
        if api_base in _windows:
            return _windows[api_base]
    window = ask_server(api_base)
    logger.info("context size of %s: %s", api_base, window if window else "not reported")
    with _lock:
        _windows[api_base] = window
    return window


def reply_reserve(lm: Any) -> int:
    kwargs = getattr(lm, "kwargs", None) or {}
    return int(kwargs.get("max_tokens") or kwargs.get("max_completion_tokens") or 512)


def _room(fixed_text: str, window: int, reserve: int, what: str) -> int:
    needed = estimate_tokens(fixed_text) + FORMAT_TOKENS
    room = window - reserve - needed
    if room < 0:
        raise PromptTooLong(needed, window, reserve, what)
    return room


def fit_passages(passages: Sequence[Any], render: Any, *, fixed_text: str, window: int,
                 reserve: int) -> tuple[list[Any], dict[str, Any]]:
    """Passages (best first) that fit beside ``fixed_text`` (module docstring); and what was done, for diagnostics.

    ``render(passages)`` is the context text they become; a passage is shortened by cutting its ``text``.
    """
    room = _room(fixed_text, window, reserve, "the prompt without retrieved passages")
    kept = list(passages)
    info = {"context_tokens": window, "passage_tokens_allowed": room, "order": ORDER,
            "passages_dropped": 0, "passages_shortened": 0}
    if not kept or estimate_tokens(render(kept)) <= room:
        return kept, info
    while kept and room // len(kept) < MIN_PASSAGE_TOKENS:
        kept.pop()
    info["passages_dropped"] = len(passages) - len(kept)
    # water-filling: the shortest keep their text, the rest share what is left equally
    order = sorted(range(len(kept)), key=lambda i: len(kept[i].text))
    left = room - estimate_tokens(render([dataclasses.replace(p, text="") for p in kept]))
    for rank, i in enumerate(order):
        share = max(0, left // (len(order) - rank))
        text = kept[i].text
        if estimate_tokens(text) > share:
            cut = max(0, share * CHARS_PER_TOKEN - 4)
            kept[i] = dataclasses.replace(kept[i], text=text[:cut].rstrip() + " ...")
            info["passages_shortened"] += 1
        left -= estimate_tokens(kept[i].text)
    return kept, info


def fit_lines(lines: Sequence[str], *, fixed_text: str, window: int, reserve: int) -> tuple[list[str], int]:
    """The newest ``lines`` (oldest first in, oldest dropped first) that fit beside ``fixed_text``; and how many
    were dropped."""
    room = _room(fixed_text, window, reserve, "the persona summary's prompt without history")
    kept = list(lines)
    while kept and estimate_tokens("\n".join(kept)) > room:
        kept.pop(0)
    return kept, len(lines) - len(kept)


_SIZES = (re.compile(r"n_prompt_tokens['\"]?\s*[:=]\s*(\d+)"), re.compile(r"\bn_ctx['\"]?\s*[:=]\s*(\d+)"))
_VLLM = re.compile(r"maximum context length is (\d+) tokens.*?(?:requested|has) (\d+) tokens", re.S)
_OVERFLOW = re.compile(r"exceed_context_size|exceeds the available context size|maximum context length|"
                       r"context length exceeded|ContextWindowExceeded|context window", re.IGNORECASE)


def _error_text(exc: BaseException) -> str:
    """An error's message with the server's own reply body and the errors it was raised from (litellm keeps the
    sizes llama.cpp sends only in the response body and in the error it wraps)."""
    parts, seen = [], 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        parts.append(f"{type(current).__name__}: {current}")
        for extra in (getattr(current, "body", None), getattr(getattr(current, "response", None), "text", None)):
            if extra:
                parts.append(str(extra))
        current, seen = current.__cause__ or current.__context__, seen + 1
    return "\n".join(parts)


def overflow_sizes(exc: BaseException) -> str | None:
    """For an error saying the prompt exceeded the server's context: a sentence naming both sizes; else None."""
    try:
        text = _error_text(exc)
    except Exception:  # a response whose body cannot be read: the message alone
        text = f"{type(exc).__name__}: {exc}"
    if not _OVERFLOW.search(text):
        return None
    prompt, window = (m.group(1) if (m := pattern.search(text)) else None for pattern in _SIZES)
    vllm = _VLLM.search(text)
    if vllm:
        window, prompt = vllm.group(1), vllm.group(2)
    sizes = f" ({prompt} tokens)" if prompt else ""
    limit = f" of {window} tokens" if window else ""
    return f"the prompt{sizes} exceeds the server's context{limit}: this item is scored invalid"
