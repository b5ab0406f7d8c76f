"""One LM's configuration as a value: read from arguments and the environment here, and nowhere else.

``lm_config`` (the task LM) and ``optimizer_lm_config`` (an optional separate LM for textual loss and persona
updates) take arguments first, then the environment, then the defaults, and check everything a build would
(model string, api_base, a file of servers is read once): an ``LMConfig`` that exists can be built. It is frozen
and picklable, so it travels to Ray workers as is, and ``config.copy(temperature=...)`` is another LM's.

Environment: PERSONA_DSPY_LM, PERSONA_DSPY_API_BASE, PERSONA_DSPY_API_KEY, PERSONA_DSPY_ENGINE
(``litellm`` sends every LM through LiteLLM; unset or ``native``: per provider, see ``lm.engine``), and for the
optimizer LM PERSONA_DSPY_OPTIMIZER_LM, PERSONA_DSPY_OPTIMIZER_API_BASE, PERSONA_DSPY_OPTIMIZER_API_KEY.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from persona_dspy.lm.providers import (
    LOCAL,
    LOCAL_API_KEY,
    OFFLINE_MODEL,
    OFFLINE_NAMES,
    LMConfigError,
    is_local,
    names_a_pool,
    server_list,
    server_model,
)

ENV_LM = "PERSONA_DSPY_LM"
ENV_API_BASE = "PERSONA_DSPY_API_BASE"
ENV_API_KEY = "PERSONA_DSPY_API_KEY"
ENV_OPTIMIZER_LM = "PERSONA_DSPY_OPTIMIZER_LM"
ENV_OPTIMIZER_API_BASE = "PERSONA_DSPY_OPTIMIZER_API_BASE"
ENV_OPTIMIZER_API_KEY = "PERSONA_DSPY_OPTIMIZER_API_KEY"
ENV_ENGINE = "PERSONA_DSPY_ENGINE"
"""``litellm`` sends every LM through LiteLLM; unset or ``native``: per provider (``lm.engine``)."""
ENGINES = ("native", "litellm")

DEFAULT_TIMEOUT = 60.0
LOCAL_TIMEOUT = 600.0
"""The embedded server runs one request per slot on the CPU: a request may wait its turn."""


@dataclass(frozen=True)
class EmbeddedServer:
    """How the embedded llama.cpp server runs for ``local`` (``lm.local_server.ServerSettings``); None: its default."""

    port: int | None = None
    slots: int | None = None
    context_per_slot: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    prompt_cache: bool | None = None
    cache_ram_mib: int | None = None

    def options(self) -> dict[str, Any]:
        """The settings given, as ``ServerSettings`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class LMConfig:
    """Everything that makes one LM (build it with ``lm.build.build_lm(config)``); the key stays out of repr.

    ``servers``: the api_base(s), checked; ``pool`` when several were named (or a file of them): one LM over all
    (``lm.pool``). ``timeout`` None: 60 s, 600 s for the embedded server. ``max_in_flight``: per server of a pool.
    ``context_tokens``: the model's context, for a server that does not report it (``lm.budget``).
    """

    model: str = LOCAL
    servers: tuple[str, ...] = ()
    pool: bool = False
    api_key: str | None = field(default=None, repr=False)
    engine: str = "native"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout: float | None = None
    num_retries: int = 3
    cache: bool = False
    structured: bool = True
    max_in_flight: int | None = None
    context_tokens: int | None = None
    server: EmbeddedServer = EmbeddedServer()

    def __post_init__(self) -> None:
        if isinstance(self.server, Mapping):  # ``server={"slots": 2}``, as build_lm's callers write it
            object.__setattr__(self, "server", EmbeddedServer(**self.server))
        object.__setattr__(self, "servers", tuple(self.servers))
        if self.engine not in ENGINES:
            raise LMConfigError(f"{ENV_ENGINE}={self.engine!r}: use 'native' (the default) or 'litellm'")
        if self.max_tokens <= 0 or (self.timeout is not None and self.timeout <= 0):
            raise LMConfigError(f"max_tokens and timeout must be positive, got {self.max_tokens} and {self.timeout}")
        if self.num_retries < 0:
            raise LMConfigError(f"num_retries must be >= 0, got {self.num_retries}")
        if self.temperature < 0:
            raise LMConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise LMConfigError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.pool and not self.servers:
            raise LMConfigError("a server pool needs at least one server")

    @property
    def offline(self) -> bool:
        return self.model in OFFLINE_NAMES

    @property
    def local(self) -> bool:
        return is_local(self.model)

    @property
    def api_base(self) -> str | None:
        """The one server this LM talks to (None for a pool, the embedded server, a provider or the stand-in)."""
        return self.servers[0] if len(self.servers) == 1 and not self.pool else None

    @property
    def read_timeout(self) -> float:
        """``timeout``, or its default for this kind of LM."""
        if self.timeout is not None:
            return self.timeout
        return LOCAL_TIMEOUT if self.local else DEFAULT_TIMEOUT

    def copy(self, **changes: Any) -> LMConfig:
        """This configuration with ``changes`` (e.g. ``temperature=0.7``), checked again."""
        return dataclasses.replace(self, **changes)


CALL_SETTINGS = ("temperature", "max_tokens", "timeout", "num_retries", "cache", "structured", "max_in_flight",
                 "context_tokens", "server", "engine")
"""How an LM is called, as opposed to which LM: what the optimizer LM takes over from the task LM."""


def env(name: str) -> str | None:
    """An environment variable's value, stripped; None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def lm_config(model: str | None = None, api_base: str | None = None, *, api_key: str | None = None,
              **settings: Any) -> LMConfig:
    """The task LM's configuration: arguments first, then PERSONA_DSPY_LM/_API_BASE/_API_KEY/_ENGINE, then local.

    ``settings``: any ``LMConfig`` field (temperature, max_tokens, timeout, num_retries, cache, structured,
    max_in_flight, context_tokens, server, engine). Raises LMConfigError for a setting that cannot work.
    """
    return _resolve((model or "").strip() or env(ENV_LM) or LOCAL,
                    api_base if (api_base or "").strip() else env(ENV_API_BASE),
                    api_key or env(ENV_API_KEY), settings)


def optimizer_lm_config(model: str | None = None, api_base: str | None = None, *, api_key: str | None = None,
                        like: LMConfig | None = None, **settings: Any) -> LMConfig | None:
    """The separate optimizer LM's configuration, or None: then loss and updates use the task LM.

    Named by the argument or PERSONA_DSPY_OPTIMIZER_LM, with the optimizer api_base and key (argument or
    PERSONA_DSPY_OPTIMIZER_*), never the task's server: an optimizer api_base without an optimizer model raises
    LMConfigError instead of being ignored. Call settings come from ``like`` (the task LM's), then ``settings``.
    """
    name = (model or "").strip() or env(ENV_OPTIMIZER_LM)
    base = api_base if (api_base or "").strip() else env(ENV_OPTIMIZER_API_BASE)
    if not name:
        if base:
            source = "argument" if (api_base or "").strip() else ENV_OPTIMIZER_API_BASE
            raise LMConfigError(f"an optimizer api_base ({source}) was given without an optimizer model: name one "
                                f"(argument or {ENV_OPTIMIZER_LM}) or drop the api_base to use the task LM")
        return None
    inherited = {key: getattr(like, key) for key in CALL_SETTINGS} if like is not None else {}
    return _resolve(name, base, api_key or env(ENV_OPTIMIZER_API_KEY), {**inherited, **settings})


def _resolve(name: str, base: str | None, key: str | None, settings: dict[str, Any]) -> LMConfig:
    settings = {k: v for k, v in settings.items() if v is not None}
    settings.setdefault("engine", (env(ENV_ENGINE) or "native").lower())
    unknown = set(settings) - set(CALL_SETTINGS)
    if unknown:
        raise TypeError(f"unknown LM setting(s): {', '.join(sorted(unknown))}; known: {', '.join(CALL_SETTINGS)}")
    if name in OFFLINE_NAMES:
        return LMConfig(OFFLINE_MODEL, **settings)
    if is_local(name):
        if base:
            raise LMConfigError(f"{name!r} starts its own server on 127.0.0.1: drop the api_base {base!r}, or name "
                                "the model that server serves (e.g. openai/<model>)")
        return LMConfig(name, **settings)
    if base and names_a_pool(base):
        urls = server_list(base) or []
        model = server_model(name, urls[0])[0]
        return LMConfig(model, tuple(urls), True, key or LOCAL_API_KEY, **settings)
    model, checked = server_model(name, base)
    return LMConfig(model, (checked,) if checked else (), False, key or (LOCAL_API_KEY if checked else None),
                    **settings)
