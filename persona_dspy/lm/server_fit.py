"""Matching a command to the server it talks to, and saying what the server's failures mean.

A request to a llama.cpp server waits for a free slot before the model reads it, so on a busy CPU a 60 s timeout
counts queueing, not generation; more workers than slots only lengthen that queue. So for a server on this machine
(127.0.0.1, localhost) the read timeout defaults to the embedded server's 600 s, the workers are capped at the slots
the server reports (llama.cpp's ``/props`` ``total_slots``; the embedded server's own settings), and the context
size it reports (or ``--context-tokens``) is what prompts are fitted to (``persona_dspy.lm.budget``).

``explain_lm_error`` turns an error's text into what happened: nothing listening (connection refused), a reply that
did not come in time from a server that accepted the request (busy), a prompt larger than the context (both sizes),
a model the server does not serve. It never asks whether a server is running when that server answered.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any
from urllib.parse import urlsplit

from persona_dspy.console import plural
from persona_dspy.lm import budget

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
LOCAL_READ_TIMEOUT = 600.0


def _api_base(lm: Any) -> str | None:
    """The server an LM talks to; for a pool of servers (``lm.pool``), all of them."""
    kwargs = getattr(lm, "kwargs", None) or {}
    pool_urls = getattr(getattr(lm, "engine", None), "server_urls", None)
    return kwargs.get("api_base") or kwargs.get("base_url") or (", ".join(pool_urls()) if callable(pool_urls) else None)


def is_loopback(api_base: str | None) -> bool:
    try:
        return bool(api_base) and urlsplit(api_base).hostname in LOOPBACK_HOSTS
    except ValueError:
        return False


def server_slots(api_base: str) -> int | None:
    """The parallel slots a llama.cpp server reports (``/props`` ``total_slots``), or None."""
    root = re.sub(r"/v1/?$", "", api_base.rstrip("/"))
    try:
        slots = budget._get_json(f"{root}/props").get("total_slots")
        return int(slots) if slots else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def fit_to_server(lm: Any, args: argparse.Namespace) -> None:
    """Timeout, context size and workers for this server (module docstring); says on stderr what it changed."""
    api_base = _api_base(lm)
    if getattr(args, "context_tokens", None):
        budget.declare_context(api_base, args.context_tokens)
    if not api_base or not is_loopback(api_base):
        return
    local = sys.modules.get("persona_dspy.lm.local_server")
    embedded = local.served_by(api_base) if local is not None else None
    if embedded is None and getattr(args, "timeout", None) is None and getattr(lm, "kwargs", None) is not None:
        lm.kwargs["timeout"] = LOCAL_READ_TIMEOUT  # requests to a server on this machine queue for its slots
    workers = getattr(args, "workers", None)
    slots = (embedded["slots"] if embedded else server_slots(api_base)) if workers else None
    if slots and workers > slots:
        note = (f"the {'embedded ' if embedded else ''}server at {api_base} has {slots} slot(s): running "
                f"{plural(slots, 'user')} at a time instead of {workers} (more would only queue)")
        if embedded:  # its slots are sized on purpose (``lm.local_server``): --server-slots raises them
            logger.info("%s", note)
        else:
            print(f"persona-dspy: note: {note}", file=sys.stderr)
        args.workers = slots


_REFUSED = re.compile(r"connection refused|connection error|connecterror|cannot connect|failed to establish|"
                      r"name or service not known|nodename nor servname|no route to host|connection reset",
                      re.IGNORECASE)
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
_NO_MODEL = re.compile(r"model .{0,80}(not found|does not exist)|NotFoundError|404", re.IGNORECASE)


def explain_lm_error(error: str, lm: Any) -> str:
    """A parenthesised sentence saying what the server did, for the end of an error message ("" if unknown)."""
    api_base = _api_base(lm)
    if not api_base or not error:
        return ""
    overflow = budget.overflow_sizes(RuntimeError(error))
    if overflow is not None:
        return (f" (the server at {api_base} answered: {overflow.partition(':')[0]}; raise the server's context or "
                "pass --context-tokens so that prompts are fitted to it)")
    if _REFUSED.search(error):
        return f" (nothing accepted the connection: is the LM server at {api_base} running?)"
    if _TIMEOUT.search(error):
        timeout = (getattr(lm, "kwargs", None) or {}).get("timeout")
        return (f" (the server at {api_base} accepted the request but sent no reply within {timeout} s: it was busy "
                "or slow, requests wait for a free slot; raise --timeout or lower --workers)")
    if _NO_MODEL.search(error):
        model = str(getattr(lm, "model", "")).partition("/")[2]
        return f" (the server at {api_base} answered, but not for model {model!r}: check the model id it serves)"
    return ""
