"""What reports and saved programs record about an LM: model, engine, server (without credentials), settings."""

from __future__ import annotations

import sys
from typing import Any

from persona_dspy.lm.providers import OFFLINE_MODEL
from persona_dspy.lm.redact import redact_url


def is_offline(lm: Any) -> bool:
    """Whether an LM is the offline stand-in (reports flag such runs as plumbing checks, not results)."""
    return getattr(lm, "model", None) == OFFLINE_MODEL


def engine_kind(lm: Any) -> str:
    """'offline', 'litellm', 'lm15', 'auto' or the custom engine's class name."""
    engine = getattr(lm, "engine", None)
    if is_offline(lm):
        return "offline"
    if isinstance(engine, str):
        return engine
    return type(engine).__name__ if engine is not None else type(lm).__name__


def describe_lm(lm: Any) -> dict[str, Any]:
    """What reports and saved programs record about the LM that produced them (never the key)."""
    kwargs = dict(getattr(lm, "kwargs", {}) or {})
    return {
        "model": getattr(lm, "served_as", None) or getattr(lm, "model", None),
        "engine": engine_kind(lm),
        "offline": is_offline(lm),
        "api_base": redact_url(kwargs.get("api_base") or kwargs.get("base_url")),
        "temperature": kwargs.get("temperature"),
        "max_tokens": kwargs.get("max_tokens", kwargs.get("max_completion_tokens")),
        "timeout": kwargs.get("timeout"),
        "num_retries": getattr(lm, "num_retries", None),
        "cache": getattr(lm, "cache", None),
        **_local_server(kwargs.get("api_base")),
        **_pool_servers(lm),
    }


def _pool_servers(lm: Any) -> dict[str, Any]:
    """The servers of a pool LM (``lm.pool``), without credentials."""
    urls = getattr(getattr(lm, "engine", None), "server_urls", None)
    return {"servers": urls()} if callable(urls) else {}


def _local_server(api_base: str | None) -> dict[str, Any]:
    """The embedded server's model and settings, when ``api_base`` is one this process started."""
    local = sys.modules.get("persona_dspy.lm.local_server")  # never imported just to describe an LM
    served = local.served_by(api_base) if local is not None else None
    return {"local_server": served} if served else {}


