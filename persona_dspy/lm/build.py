"""The one place that builds persona-dspy's LMs, describes them for reports, and meters their use.

Which engine: OpenAI-compatible servers (``openai/<model>`` or ``hosted_vllm/<model>`` with an api_base, and the
embedded server) run on dspy's native engine through ``lm.native`` (``max_tokens`` and the JSON schema on the wire,
a fraction of LiteLLM's client CPU per call); LiteLLM (``engine="litellm"``) stays for Ollama, providers without an
api_base, and ``cache=True`` (the per-server cache header is a setting only LiteLLM carries).
``PERSONA_DSPY_ENGINE=litellm`` sends everything through LiteLLM, as before (a switch for comparisons). Every LM
built here carries the LM-call meter (``persona_dspy.lm.usage.METER``). Model strings:

* ``local`` (the default when no model is named): the embedded llama.cpp server (``lm.local_server``) started on
  127.0.0.1 with the default model (SmolLM2-135M-Instruct, fetched once into the cache, see ``lm.models``);
  ``local/<path.gguf>`` or ``local/<known model name>`` serves another GGUF.
* ``offline`` (or ``offline/stand-in``): the deterministic stand-in, no server, no model.
* ``openai/<model>`` with an api_base: vLLM, SGLang or llama.cpp's server (``http://host:port/v1``).
* a bare model id with an api_base, as users paste it from a server's command line (``qwen2.5``,
  ``Qwen/Qwen2.5-7B-Instruct``: its first part is not a LiteLLM provider): the same, ``openai/`` is prefixed.
* ``hosted_vllm/<model>`` with an api_base: vLLM through LiteLLM's vLLM provider.
* ``ollama_chat/<model>``: Ollama (api_base ``http://host:11434``, without ``/v1``).

With ``cache=True`` the response cache is keyed by server (dspy's own key ignores api_base, so two servers would
share answers): see ``CACHE_SCOPE_HEADER``. Whatever describes an LM in a file or report goes through
``describe_lm``/``redact_lm_state``, which drop credentials from URLs and headers.

Structured outputs: OpenAI-compatible servers (the embedded one, llama.cpp, vLLM, SGLang) decode under a JSON schema
(``response_format``), so labels are always one of the task's labels. The native ``ServerLM`` says so itself; LiteLLM
only sends a schema for models it knows support one, so ``_build`` declares it for those LMs (``structured=False``
turns it off for a server that rejects schemas); ``lm.adapters`` then picks dspy's JSONAdapter for them.

Settings come from arguments first, then the environment: PERSONA_DSPY_LM, PERSONA_DSPY_API_BASE,
PERSONA_DSPY_API_KEY, and for an optional separate loss/update LM PERSONA_DSPY_OPTIMIZER_LM,
PERSONA_DSPY_OPTIMIZER_API_BASE, PERSONA_DSPY_OPTIMIZER_API_KEY.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# dspy and litellm fetch a model-metadata map from GitHub on first use unless told not to; runs stay local.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

if TYPE_CHECKING:  # dspy is imported where an LM is built: checking LM settings stays fast
    import dspy
    from dspy.utils.callback import BaseCallback

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    """``LMUsage`` is re-exported from here (reports and tests import it so) without importing dspy up front."""
    if name == "LMUsage":
        from persona_dspy.lm.usage import LMUsage

        return LMUsage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

ENV_LM = "PERSONA_DSPY_LM"
ENV_API_BASE = "PERSONA_DSPY_API_BASE"
ENV_API_KEY = "PERSONA_DSPY_API_KEY"
ENV_OPTIMIZER_LM = "PERSONA_DSPY_OPTIMIZER_LM"
ENV_OPTIMIZER_API_BASE = "PERSONA_DSPY_OPTIMIZER_API_BASE"
ENV_OPTIMIZER_API_KEY = "PERSONA_DSPY_OPTIMIZER_API_KEY"
ENV_ENGINE = "PERSONA_DSPY_ENGINE"
"""``litellm`` sends every LM through LiteLLM (the engine before the native path); unset or ``native``: per provider."""

LOCAL_API_KEY = "local"
"""Sent when a server is named but no key is: local servers ignore it, but LiteLLM's OpenAI client wants one."""

OFFLINE_MODEL = "offline/stand-in"
"""The model name the offline stand-in (a test double in ``persona_dspy.testing``) carries, so reports flag it."""
_OFFLINE_NAMES = {"offline", OFFLINE_MODEL}
DEFAULT_TIMEOUT = 60.0
LOCAL_TIMEOUT = 600.0
LOCAL = "local"
"""The embedded llama.cpp server with the default model; ``local/<path.gguf>`` for another GGUF."""
_OLLAMA_PROVIDERS = {"ollama", "ollama_chat"}
_COMMON_PROVIDERS = {"openai", "hosted_vllm", "vllm", "ollama", "ollama_chat", "openai_like", "custom_openai",
                     "lm_studio", "llamafile", "huggingface", "together_ai", "openrouter", "anthropic", "gemini"}
"""LiteLLM providers recognised without importing LiteLLM (which takes seconds); others are looked up."""

CACHE_SCOPE_HEADER = "X-Persona-Dspy-Cache-Scope"
"""Sent with every request of an LM built with ``cache=True`` for a server: a hash of the server's api_base.

dspy's response-cache key leaves out ``api_base`` (and ``base_url``), so two LMs with the same model name on two
servers would answer each other's requests from the cache. The key does include ``extra_headers``, so a header
naming the server keys the cache by server; servers ignore unknown headers, and ``lm.copy(...)`` keeps it."""


class LMConfigError(ValueError):
    """An LM setting that cannot work, reported before any request is sent."""


class LMOptions(TypedDict, total=False):
    """How an LM is called, for the task LM and the optimizer LM alike (defaults: ``_build``'s)."""

    temperature: float
    max_tokens: int
    timeout: float
    num_retries: int
    cache: bool
    callbacks: list[BaseCallback] | None
    structured: bool
    server: LocalServerOptions
    max_in_flight: int
    """Per server, when the api_base names several (a pool, ``lm.pool``); ignored for one server."""


class LocalServerOptions(TypedDict, total=False):
    """How the embedded server for ``local`` runs (see ``lm.local_server.ServerSettings``)."""

    port: int
    slots: int
    context_per_slot: int
    threads: int
    gpu_layers: int
    prompt_cache: bool
    cache_ram_mib: int


@dataclass(frozen=True)
class LMSettings:
    """Resolved connection settings of one LM (the key is kept out of repr so logs never show it)."""

    model: str
    api_base: str | None = None
    api_key: str | None = field(default=None, repr=False)

    @property
    def offline(self) -> bool:
        return self.model in _OFFLINE_NAMES

    @property
    def local(self) -> bool:
        return is_local(self.model)


def is_local(model: str) -> bool:
    """``local`` or ``local/<model>``: the embedded server, not a provider."""
    return model == LOCAL or model.startswith(LOCAL + "/")


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def check_api_base(api_base: str) -> str:
    """Validate and normalize an api_base ('http(s)://host[:port][/path]', no trailing slash)."""
    text = api_base.strip()
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError as exc:
        raise LMConfigError(f"malformed api_base {api_base!r}: {exc}; expected e.g. http://127.0.0.1:8000/v1") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise LMConfigError(
            f"malformed api_base {api_base!r}: expected http(s)://host[:port][/path], e.g. http://127.0.0.1:8000/v1"
        )
    return text.rstrip("/")


def _is_litellm_provider(prefix: str) -> bool:
    """Whether ``prefix`` (the part before the first '/') names a LiteLLM provider."""
    if prefix in _COMMON_PROVIDERS:
        return True
    if prefix != prefix.lower():  # LiteLLM's providers are lowercase; 'Qwen/...' is a Hugging Face organisation
        return False
    import litellm  # only for unusual prefixes: the import is slow

    return prefix in {getattr(p, "value", p) for p in litellm.provider_list}


def _litellm_model(model: str, api_base: str | None) -> str:
    """The model string LiteLLM gets: a bare id or an unknown first part with an api_base means openai/<model>."""
    if "://" in model:
        url = redact_url(model)
        raise LMConfigError(f"the model {url!r} is a URL: pass the server's URL as the api_base (--api-base) and the "
                            f"model it serves as the model (--lm), e.g. --lm openai/<model> --api-base {url}")
    provider, slash, rest = model.partition("/")
    if slash and (not provider or not rest.strip()):
        raise LMConfigError(f"model {model!r} needs a provider and a model name, e.g. openai/qwen2.5-7b-instruct")
    if slash and _is_litellm_provider(provider):
        return model
    if api_base:
        logger.info("model %r has no LiteLLM provider prefix; using openai/%s against %s (an OpenAI-compatible "
                    "server)", model, model, redact_url(api_base))
        return f"openai/{model}"
    what = f"{provider!r} is not a LiteLLM provider" if slash else "no provider prefix"
    raise LMConfigError(
        f"model {model!r} has {what} and no api_base: for an OpenAI-compatible server (vLLM, SGLang, llama.cpp) "
        "pass its api_base (the model id is then sent as is), or use 'offline', openai/<model> or "
        "hosted_vllm/<model> with an api_base, or ollama_chat/<model> (Ollama)"
    )


def resolve_lm_settings(model: str | None = None, api_base: str | None = None, api_key: str | None = None, *,
                        env_lm: str = ENV_LM, env_api_base: str = ENV_API_BASE,
                        env_api_key: str = ENV_API_KEY) -> LMSettings:
    """Arguments first, then the environment, then ``local``; raises LMConfigError for a bad api_base."""
    name = (model or "").strip() or _env(env_lm) or LOCAL
    if name in _OFFLINE_NAMES:
        return LMSettings(OFFLINE_MODEL)
    base = api_base if api_base is not None and api_base.strip() else _env(env_api_base)
    if is_local(name):
        if base:
            raise LMConfigError(f"{name!r} starts its own server on 127.0.0.1: drop the api_base {base!r}, or name "
                                "the model that server serves (e.g. openai/<model>)")
        return LMSettings(name)
    base = check_api_base(base) if base else None
    name = _litellm_model(name, base)
    if base and name.partition("/")[0] in _OLLAMA_PROVIDERS and base.endswith("/v1"):
        base = base.removesuffix("/v1")  # Ollama's native API lives at the root; /v1 is its OpenAI shim
    if base and not urlsplit(base).path and name.partition("/")[0] in ("openai", "hosted_vllm"):
        logger.warning("api_base %s has no path; OpenAI-compatible servers usually serve under /v1", base)
    key = api_key or _env(env_api_key) or (LOCAL_API_KEY if base else None)
    return LMSettings(name, base, key)


def build_lm(model: str | None = None, api_base: str | None = None, *, api_key: str | None = None,
             **options: Unpack[LMOptions]) -> dspy.LM:
    """The task LM: the embedded local model (default), a server's, or the offline stand-in.

    ``options``: temperature (default 0), max_tokens (512), timeout (60 s; 600 s for ``local``), num_retries (3),
    cache (False), callbacks, structured (True: JSON-schema outputs on OpenAI-compatible servers), server (the
    embedded server's settings, for ``local``; LMs built with the same settings share one server).
    An api_base naming several servers (commas, or a file of URLs) builds a pool (``lm.pool``).
    """
    pooled = _pool(model, api_base, ENV_API_BASE, api_key, options)
    if pooled is not None:
        return pooled
    options.pop("max_in_flight", None)
    return _build(resolve_lm_settings(model, api_base, api_key), **options)


def _pool(model: str | None, api_base: str | None, env_api_base: str, api_key: str | None,
          options: dict[str, Any]) -> dspy.LM | None:
    """A pool LM when the api_base (argument, else environment) names several servers or a file; else None."""
    base = api_base if (api_base or "").strip() else _env(env_api_base)
    if not base or ("," not in base and ("://" in base or not os.path.isfile(os.path.expanduser(base.strip())))):
        return None
    from persona_dspy.lm.pool import DEFAULT_MAX_IN_FLIGHT, build_pool_lm, server_list

    servers = server_list(base) or []
    return build_pool_lm(model, servers, api_key=api_key,
                         max_in_flight=options.pop("max_in_flight", None) or DEFAULT_MAX_IN_FLIGHT, **options)


def _build(settings: LMSettings, *, temperature: float = 0.0, max_tokens: int = 512, timeout: float | None = None,
           num_retries: int = 3, cache: bool = False, callbacks: list[BaseCallback] | None = None,
           structured: bool = True, server: LocalServerOptions | None = None) -> dspy.LM:
    """The one place every LM (task or optimizer) is built, so every one is checked the same way."""
    if timeout is None:  # the embedded server runs one request per slot on the CPU: a request may wait its turn
        timeout = LOCAL_TIMEOUT if settings.local else DEFAULT_TIMEOUT
    if max_tokens <= 0 or timeout <= 0:
        raise LMConfigError(f"max_tokens and timeout must be positive, got {max_tokens} and {timeout}")
    if num_retries < 0:
        raise LMConfigError(f"num_retries must be >= 0, got {num_retries}")
    from persona_dspy.lm.usage import METER

    callbacks = [*(callbacks or []), METER]
    if settings.offline:
        # The stand-in is test support, loaded only when asked for by name. A custom engine owns its connection:
        # dspy refuses api_base/api_key/timeout with one, so drop them.
        from persona_dspy.testing.offline_lm import offline_lm

        return offline_lm(temperature=temperature, max_tokens=max_tokens, cache=cache, callbacks=callbacks)
    if settings.local:
        settings = _start_local(settings, server or {})
    if _native(settings, cache):
        from persona_dspy.lm.native import ServerLM, native_model

        lm = ServerLM(str(native_model(settings.model)), served_as=settings.model, structured=structured,
                      temperature=temperature, max_tokens=max_tokens, timeout=timeout, num_retries=num_retries,
                      cache=cache, callbacks=callbacks, api_base=settings.api_base, api_key=settings.api_key)
        logger.info("built LM %s", describe_lm(lm))
        return lm
    connection: dict[str, Any] = {}
    if settings.api_base:
        connection["api_base"] = settings.api_base
    if settings.api_key:
        connection["api_key"] = settings.api_key
    if structured and settings.api_base and settings.model.partition("/")[0] in _SCHEMA_PROVIDERS:
        _declare_response_schema(settings.model)
    if cache and settings.api_base:
        connection["extra_headers"] = {CACHE_SCOPE_HEADER: cache_scope(settings.api_base)}
    import dspy

    lm = dspy.LM(settings.model, engine="litellm", temperature=temperature, max_tokens=max_tokens, timeout=timeout,
                 num_retries=num_retries, cache=cache, callbacks=callbacks, **connection)
    logger.info("built LM %s", describe_lm(lm))
    return lm


_SCHEMA_PROVIDERS = {"openai", "hosted_vllm"}


def _native(settings: LMSettings, cache: bool) -> bool:
    """Whether this LM runs on dspy's native engine (see the module docstring for the choice per provider)."""
    engine = (_env(ENV_ENGINE) or "native").lower()
    if engine not in ("native", "litellm"):
        raise LMConfigError(f"{ENV_ENGINE}={engine!r}: use 'native' (the default) or 'litellm'")
    from persona_dspy.lm.native import native_model

    return engine == "native" and bool(settings.api_base) and not cache and native_model(settings.model) is not None


def _declare_response_schema(model: str) -> None:
    """Tell LiteLLM this server model decodes under a JSON schema, so dspy's JSONAdapter sends one.

    Unknown models count as schema-less for LiteLLM, and dspy then asks only for "some JSON object", which a small
    model fills with the wrong shape. llama.cpp, vLLM and SGLang all enforce ``response_format: json_schema``.
    """
    import litellm

    if model not in litellm.model_cost:
        litellm.register_model({model: {"litellm_provider": model.partition("/")[0], "mode": "chat",
                                        "supports_response_schema": True}})


def _start_local(settings: LMSettings, options: LocalServerOptions) -> LMSettings:
    """Resolve the GGUF (fetching the default model once), start the shared embedded server, point at it."""
    from persona_dspy.lm.local_server import LOCAL_MODEL_NAME, ServerSettings, shared_server
    from persona_dspy.lm.models import resolve_model

    path = resolve_model(settings.model.partition("/")[2] or None)
    server = shared_server(ServerSettings(path, **options))
    return LMSettings(f"openai/{LOCAL_MODEL_NAME}", server.api_base, LOCAL_API_KEY)


def build_optimizer_lm(model: str | None = None, api_base: str | None = None, *, task_lm: dspy.LM | None = None,
                       **options: Unpack[LMOptions]) -> dspy.LM:
    """The LM for textual loss and persona updates.

    Either fully its own (a model from the argument or PERSONA_DSPY_OPTIMIZER_LM, with the optimizer api_base and
    PERSONA_DSPY_OPTIMIZER_API_KEY), or entirely the task LM: ``task_lm`` itself when given, else one built from the
    task settings. Mixing a separate optimizer model with the task's server would send it to the wrong place, so that
    never happens: an optimizer api_base (argument or PERSONA_DSPY_OPTIMIZER_API_BASE) without an optimizer model
    raises LMConfigError instead of being ignored. ``options`` as for ``build_lm``.
    """
    name = (model or "").strip() or _env(ENV_OPTIMIZER_LM)
    if not name:
        if (api_base or "").strip() or _env(ENV_OPTIMIZER_API_BASE):
            source = "argument" if (api_base or "").strip() else ENV_OPTIMIZER_API_BASE
            raise LMConfigError(f"an optimizer api_base ({source}) was given without an optimizer model: name one "
                                f"(argument or {ENV_OPTIMIZER_LM}) or drop the api_base to use the task LM")
        if task_lm is not None:
            return task_lm
        return build_lm(None, None, **options)
    pooled = _pool(name, api_base, ENV_OPTIMIZER_API_BASE, _env(ENV_OPTIMIZER_API_KEY), options)
    if pooled is not None:
        return pooled
    options.pop("max_in_flight", None)
    settings = resolve_lm_settings(name, api_base, env_lm=ENV_OPTIMIZER_LM, env_api_base=ENV_OPTIMIZER_API_BASE,
                                   env_api_key=ENV_OPTIMIZER_API_KEY)
    return _build(settings, **options)


def cache_scope(api_base: str) -> str:
    """What keys the response cache by server: a hash of the normalized api_base (never the URL itself)."""
    return hashlib.sha256(api_base.rstrip("/").encode("utf-8")).hexdigest()[:16]


REDACTED = "REDACTED"
_SECRET_PART = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential|session|cookie", re.IGNORECASE)
"""Query parameter and header names whose values are credentials (``?key=``, ``Authorization``, ``X-Api-Key``)."""
_SECRET_SETTING = re.compile(r"(^|_)(api_key|key|secret|password|credentials?|access_token|session_token|"
                             r"ad_token|refresh_token)$|secret|password|credential", re.IGNORECASE)
"""LM settings holding a credential (``api_key``, ``aws_secret_access_key``...), but not ``max_tokens``."""
_URL_SETTINGS = ("api_base", "base_url")
_HEADER_SETTINGS = ("extra_headers", "headers", "extra_query")
_URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact_url(url: str | None) -> str | None:
    """A URL without credentials: no user:password@, secret-looking query values (``?key=``) replaced."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return REDACTED  # not parsable: it cannot be shown safely
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{port}" if port else host
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PART.search(name) for name, _ in pairs):
            query = urlencode([(name, REDACTED if _SECRET_PART.search(name) else value) for name, value in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))




def redact_headers(headers: Mapping[str, Any] | None, *, drop: bool = False) -> dict[str, Any] | None:
    """Headers (or query parameters) with credential values replaced (or dropped): Authorization, X-Api-Key..."""
    if headers is None:
        return None
    clean = {}
    for name, value in dict(headers).items():
        if not _SECRET_PART.search(str(name)):
            clean[name] = value
        elif not drop:
            clean[name] = REDACTED
    return clean


def redact_lm_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """An LM's settings or dspy state (``LM.dump_state()``) as safe to write: credentials dropped or replaced.

    Credential headers are dropped rather than replaced: dspy restores a predictor's headers when it loads the
    state, and a placeholder would then be sent as if it were a credential.
    """
    clean: dict[str, Any] = {}
    for key, value in state.items():
        if _SECRET_SETTING.search(str(key)):
            continue
        if key in _URL_SETTINGS and isinstance(value, str):
            value = redact_url(value)
        elif key in _HEADER_SETTINGS and isinstance(value, Mapping):
            value = redact_headers(value, drop=True)
        clean[key] = value
    return clean


def redact_text(text: str) -> str:
    """Free text (an error message) with every URL redacted and bearer tokens replaced."""
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)) or "",
                                                                             text))


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


