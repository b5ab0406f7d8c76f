"""Which engine runs an LM, and what that engine needs told.

OpenAI-compatible servers (``openai/<model>`` or ``hosted_vllm/<model>`` with an api_base, and the embedded
server) run on dspy's native engine through ``lm.native`` (``max_tokens`` and the JSON schema on the wire, a
fraction of LiteLLM's client CPU per call). LiteLLM stays for Ollama, providers without an api_base, ``cache=True``
(the per-server cache header is a setting only LiteLLM carries) and ``engine="litellm"``.

Structured outputs: OpenAI-compatible servers decode under a JSON schema (``response_format``), so labels are always
one of the task's labels. The native ``ServerLM`` says so itself; LiteLLM only sends a schema for models it knows
support one, so ``declare_response_schema`` declares it for those LMs (``structured=False`` turns it off for a server
that rejects schemas); ``lm.adapters`` then picks dspy's JSONAdapter for them.
"""

from __future__ import annotations

import hashlib

from persona_dspy.lm.config import LMConfig

SCHEMA_PROVIDERS = frozenset({"openai", "hosted_vllm"})
"""LiteLLM providers whose servers decode under a JSON schema (llama.cpp, vLLM, SGLang)."""

CACHE_SCOPE_HEADER = "X-Persona-Dspy-Cache-Scope"
"""Sent with every request of an LM built with ``cache=True`` for a server: a hash of the server's api_base.

dspy's response-cache key leaves out ``api_base`` (and ``base_url``), so two LMs with the same model name on two
servers would answer each other's requests from the cache. The key does include ``extra_headers``, so a header
naming the server keys the cache by server; servers ignore unknown headers, and ``lm.copy(...)`` keeps it."""


def uses_native(config: LMConfig, model: str, api_base: str | None) -> bool:
    """Whether ``model`` at ``api_base`` (one server of ``config``) runs on dspy's native engine."""
    from persona_dspy.lm.native import native_model

    return (config.engine == "native" and bool(api_base) and not config.cache
            and native_model(model) is not None)


def wants_schema(config: LMConfig, model: str, api_base: str | None) -> bool:
    """Whether a LiteLLM LM should be declared to decode under a JSON schema."""
    return config.structured and bool(api_base) and model.partition("/")[0] in SCHEMA_PROVIDERS


def declare_response_schema(model: str) -> None:
    """Tell LiteLLM this server model decodes under a JSON schema, so dspy's JSONAdapter sends one.

    Unknown models count as schema-less for LiteLLM, and dspy then asks only for "some JSON object", which a small
    model fills with the wrong shape. llama.cpp, vLLM and SGLang all enforce ``response_format: json_schema``.
    """
    import litellm

    if model not in litellm.model_cost:
        litellm.register_model({model: {"litellm_provider": model.partition("/")[0], "mode": "chat",
                                        "supports_response_schema": True}})


def cache_scope(api_base: str) -> str:
    """What keys the response cache by server: a hash of the normalized api_base (never the URL itself)."""
    return hashlib.sha256(api_base.rstrip("/").encode("utf-8")).hexdigest()[:16]
