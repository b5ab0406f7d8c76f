"""The one place that builds persona-dspy's LMs, from an ``LMConfig`` (``lm.config``) or ``build_lm``'s arguments.

Every LM built here carries the LM-call meter (``persona_dspy.lm.usage.METER``). ``local`` starts (or reuses) the
embedded llama.cpp server (``lm.local_server``) with the default model, fetched once into the cache (``lm.models``);
``offline`` is the deterministic stand-in (``persona_dspy.testing``, loaded only when asked for by name); a pool's
servers each get an LM, behind one ``lm.pool.ServerPool``. Which engine runs a server's LM: ``lm.engine``. With
``cache=True`` the response cache is keyed by server (``lm.engine.CACHE_SCOPE_HEADER``).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from persona_dspy.lm.budget import declare_context
from persona_dspy.lm.config import LMConfig, lm_config, optimizer_lm_config
from persona_dspy.lm.engine import (
    CACHE_SCOPE_HEADER,
    cache_scope,
    declare_response_schema,
    uses_native,
    wants_schema,
)
from persona_dspy.lm.providers import LOCAL_API_KEY
from persona_dspy.lm.report import describe_lm

# dspy and litellm fetch a model-metadata map from GitHub on first use unless told not to; runs stay local.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

if TYPE_CHECKING:  # dspy is imported where an LM is built: checking LM settings stays fast
    import dspy
    from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)


def build_lm(model: str | LMConfig | None = None, api_base: str | None = None, *, api_key: str | None = None,
             callbacks: list[BaseCallback] | None = None, **settings: Any) -> dspy.LM:
    """The task LM: the embedded local model (default), a server's (or a pool of servers'), or the offline stand-in.

    ``model`` is a model string (then arguments first, the environment next: ``lm.config.lm_config``) or an
    ``LMConfig`` (``settings`` then change a copy of it). ``settings``: temperature (default 0), max_tokens (512),
    timeout (60 s; 600 s for ``local``), num_retries (3), cache (False), structured (True: JSON-schema outputs on
    OpenAI-compatible servers), server (the embedded server's settings: LMs built with the same share one server),
    max_in_flight (per server of a pool). ``callbacks``: dspy callbacks for this LM, besides the meter.
    """
    if isinstance(model, LMConfig):
        if api_base is not None or api_key is not None:
            raise TypeError("an LMConfig carries its api_base and key: change them with config.copy(...)")
        config = model.copy(**settings) if settings else model
    else:
        config = lm_config(model, api_base, api_key=api_key, **settings)
    return _pool(config, callbacks) if config.pool else _build(config, config.api_base, callbacks)


def build_optimizer_lm(model: str | LMConfig | None = None, api_base: str | None = None, *,
                       task_lm: dspy.LM | None = None, callbacks: list[BaseCallback] | None = None,
                       **settings: Any) -> dspy.LM:
    """The LM for textual loss and persona updates: its own (``lm.config.optimizer_lm_config``), else the task LM.

    Without an optimizer model (argument or PERSONA_DSPY_OPTIMIZER_LM) this is ``task_lm`` itself when given, else
    the task LM built from ``settings``. ``settings`` as for ``build_lm``.
    """
    config = model if isinstance(model, LMConfig) else optimizer_lm_config(model, api_base, **settings)
    if config is None:
        return task_lm if task_lm is not None else build_lm(None, None, callbacks=callbacks, **settings)
    return build_lm(config, callbacks=callbacks)


def _build(config: LMConfig, api_base: str | None, callbacks: list[BaseCallback] | None) -> dspy.LM:
    """One LM (the stand-in, the embedded server's, or one server's): checked and metered the same way."""
    from persona_dspy.lm.usage import METER

    callbacks = [*(callbacks or []), METER]
    if config.offline:
        # The stand-in is test support, loaded only when asked for by name. A custom engine owns its connection:
        # dspy refuses api_base/api_key/timeout with one, so they are not passed.
        from persona_dspy.testing.offline_lm import offline_lm

        return offline_lm(temperature=config.temperature, max_tokens=config.max_tokens, cache=config.cache,
                          callbacks=callbacks)
    model, api_key = config.model, config.api_key
    if config.local:
        model, api_base, api_key = start_local(config)
    if config.context_tokens and api_base:  # prompts are fitted to it (``lm.budget``)
        declare_context(api_base, config.context_tokens)
    common = {"temperature": config.temperature, "max_tokens": config.max_tokens, "timeout": config.read_timeout,
              "num_retries": config.num_retries, "cache": config.cache, "callbacks": callbacks}
    if uses_native(config, model, api_base):
        from persona_dspy.lm.native import ServerLM, native_model

        lm = ServerLM(str(native_model(model)), served_as=model, structured=config.structured, api_base=api_base,
                      api_key=api_key, **common)
        logger.info("built LM %s", describe_lm(lm))
        return lm
    connection: dict[str, Any] = {}
    if api_base:
        connection["api_base"] = api_base
    if api_key:
        connection["api_key"] = api_key
    if wants_schema(config, model, api_base):
        declare_response_schema(model)
    if config.cache and api_base:
        connection["extra_headers"] = {CACHE_SCOPE_HEADER: cache_scope(api_base)}
    import dspy

    lm = dspy.LM(model, engine="litellm", **common, **connection)
    logger.info("built LM %s", describe_lm(lm))
    return lm


def start_local(config: LMConfig) -> tuple[str, str, str]:
    """Resolve the GGUF (fetching the default model once), start the shared embedded server: (model, api_base, key)."""
    from persona_dspy.lm.local_server import LOCAL_MODEL_NAME, ServerSettings, shared_server
    from persona_dspy.lm.models import resolve_model

    path = resolve_model(config.model.partition("/")[2] or None)
    server = shared_server(ServerSettings(path, **config.server.options()))
    return f"openai/{LOCAL_MODEL_NAME}", server.api_base, LOCAL_API_KEY


def _pool(config: LMConfig, callbacks: list[BaseCallback] | None) -> dspy.LM:
    """One LM over the config's servers: an LM per server (no retries, no cache), behind a ``ServerPool``."""
    from persona_dspy.lm.pool import DEFAULT_MAX_IN_FLIGHT, pool_lm
    from persona_dspy.lm.usage import METER

    single = config.copy(num_retries=0, cache=False)
    per_server = [(url, _build(single, url, None)) for url in config.servers]
    return pool_lm(per_server, max_in_flight=config.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
                   retries=config.num_retries, cache=config.cache, callbacks=[*(callbacks or []), METER])
