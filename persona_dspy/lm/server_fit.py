"""Matching a command to the server it talks to, and saying what the server's failures mean.

A request to a llama.cpp server waits for a free slot before the model reads it; more workers than slots only
lengthen that queue. So for a server on this machine (127.0.0.1, localhost) the workers are capped at the slots the
server reports (llama.cpp's ``/props`` ``total_slots``), and the context size it reports (or ``--context-tokens``)
is what prompts are fitted to (``persona_dspy.lm.budget``). Every server but the embedded one is watched
(``lm.attempts``): once its latency is known, a request it sits on is sent again (hedged); for one on this machine,
unless ``--timeout`` is given, the read timeout is 60 s until its latency is known, then follows it (the p95 times
the requests queued per slot it reports), so a hung request costs seconds, not the 600 s the embedded server gets.
``fit_to_server`` decides the workers (a ``ServerFit``), ``watch_servers`` starts the watching; the command line
applies both.

``explain_lm_error`` turns an error's text into what happened: nothing listening (connection refused), a reply that
did not come in time from a server that accepted the request (busy), a prompt larger than the context (both sizes),
a model the server does not serve. It never asks whether a server is running when that server answered.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from persona_dspy.lm import budget
from persona_dspy.lm.config import LMConfig

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def lm_api_base(lm: Any) -> str | None:
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
        slots = budget.get_json(f"{root}/props").get("total_slots")
        return int(slots) if slots else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


@dataclass(frozen=True)
class ServerFit:
    """What a command should change for its server: fewer workers (None: as asked), and why."""

    workers: int | None = None
    note: str | None = None


def fit_to_server(config: LMConfig, workers: int | None = None) -> ServerFit:
    """Workers for the server ``config`` names (module docstring): at most its slots, for the embedded server (its
    default is one) or a loopback server that reports them; a server elsewhere is not fitted."""
    servers = config.servers
    if config.local:  # its slots are sized on purpose (lm.local_server): --server-slots raises them
        slots = config.server.slots or 1
        if workers and workers > slots:
            logger.info("the embedded server has %d slot(s): running %d user(s) at a time instead of %d", slots,
                        slots, workers)
            return ServerFit(slots)
        return ServerFit()
    if not servers or not all(is_loopback(url) for url in servers):
        return ServerFit()
    slots = server_slots(servers[0]) if workers and len(servers) == 1 else None
    if workers and slots and workers > slots:
        return ServerFit(slots, f"the server at {servers[0]} has {slots} slot(s): running {slots} worker(s) instead "
                                f"of {workers} (more would only queue)")
    return ServerFit()


def watch_servers(config: LMConfig) -> None:
    """Hedge requests to every server ``config`` names but the embedded one, and let a loopback server's read timeout
    follow its latency unless a timeout was given (``lm.attempts.watch``)."""
    if config.local:
        return
    from persona_dspy.lm.attempts import watch

    local = sys.modules.get("persona_dspy.lm.local_server")
    for url in config.servers:
        if local is not None and local.served_by(url):
            continue  # the embedded server: its slots follow --workers, its timeout is set, it is never hedged
        nearby = is_loopback(url)
        watch(url, adapt_timeout=nearby and config.timeout is None, slots=server_slots(url) if nearby else None,
              ceiling=config.read_timeout)


_REFUSED = re.compile(r"connection refused|connection error|connecterror|cannot connect|failed to establish|"
                      r"name or service not known|nodename nor servname|no route to host|connection reset",
                      re.IGNORECASE)
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
_NO_MODEL = re.compile(r"model .{0,80}(not found|does not exist)|NotFoundError|404", re.IGNORECASE)


def explain_lm_error(error: str, lm: Any) -> str:
    """A parenthesised sentence saying what the server did, for the end of an error message ("" if unknown)."""
    api_base = lm_api_base(lm)
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
