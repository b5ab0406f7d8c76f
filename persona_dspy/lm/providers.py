"""Model strings and server addresses: what ``--lm`` and ``--api-base`` may say, checked before anything is built.

* ``local`` (the default) or ``local/<path.gguf | known model>``: the embedded llama.cpp server.
* ``offline`` (or ``offline/stand-in``): the deterministic stand-in, no server, no model.
* ``openai/<model>`` or ``hosted_vllm/<model>`` with an api_base; a bare model id with an api_base (``qwen2.5``,
  ``Qwen/Qwen2.5-7B-Instruct``: its first part is not a LiteLLM provider) means ``openai/<model>``.
* ``ollama_chat/<model>``: Ollama (api_base ``http://host:11434``, without ``/v1``).

An api_base naming several servers (``URL,URL`` or a file listing one URL per line) is a pool (``lm.pool``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit

from persona_dspy.lm.redact import redact_url

logger = logging.getLogger(__name__)

LOCAL = "local"
"""The embedded llama.cpp server with the default model; ``local/<path.gguf>`` for another GGUF."""
OFFLINE_MODEL = "offline/stand-in"
"""The model name the offline stand-in (a test double in ``persona_dspy.testing``) carries, so reports flag it."""
OFFLINE_NAMES = frozenset({"offline", OFFLINE_MODEL})
LOCAL_API_KEY = "local"
"""Sent when a server is named but no key is: local servers ignore it, but LiteLLM's OpenAI client wants one."""
OLLAMA_PROVIDERS = frozenset({"ollama", "ollama_chat"})
COMMON_PROVIDERS = frozenset({"openai", "hosted_vllm", "vllm", "ollama", "ollama_chat", "openai_like",
                              "custom_openai", "lm_studio", "llamafile", "huggingface", "together_ai", "openrouter",
                              "anthropic", "gemini"})
"""LiteLLM providers recognised without importing LiteLLM (which takes seconds); others are looked up."""


class LMConfigError(ValueError):
    """An LM setting that cannot work, reported before any request is sent."""


def is_local(model: str) -> bool:
    """``local`` or ``local/<model>``: the embedded server, not a provider."""
    return model == LOCAL or model.startswith(LOCAL + "/")


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


def names_a_pool(api_base: str) -> bool:
    """Whether an api_base names several servers: a comma-separated list, or a file listing them."""
    text = api_base.strip()
    return "," in text or ("://" not in text and Path(text).expanduser().is_file())


def server_list(api_base: str | None) -> list[str] | None:
    """The servers ``api_base`` names: one URL, several separated by commas, or a file of them; None for none.

    Each URL is checked (``check_api_base``); a file that names none, or an entry that is not a URL, raises
    LMConfigError naming it.
    """
    text = (api_base or "").strip()
    if not text:
        return None
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise LMConfigError(f"api_base {text!r} is neither a URL nor a file listing servers")
        entries = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        urls = [entry for entry in entries if entry]
        if not urls:
            raise LMConfigError(f"the server file {path} names no server (one URL per line)")
        where = f" (in {path})"
    else:
        urls, where = [part.strip() for part in text.split(",") if part.strip()], ""
    checked = []
    for url in urls:
        try:
            checked.append(check_api_base(url))
        except LMConfigError as exc:
            raise LMConfigError(f"{exc}{where}") from exc
    if len(set(checked)) != len(checked):
        raise LMConfigError(f"a server is named twice in {redact_url(text) if where == '' else where.strip(' ()')}")
    return checked


def is_litellm_provider(prefix: str) -> bool:
    """Whether ``prefix`` (the part before the first '/') names a LiteLLM provider."""
    if prefix in COMMON_PROVIDERS:
        return True
    if prefix != prefix.lower():  # LiteLLM's providers are lowercase; 'Qwen/...' is a Hugging Face organisation
        return False
    import litellm  # only for unusual prefixes: the import is slow

    return prefix in {getattr(p, "value", p) for p in litellm.provider_list}


def litellm_model(model: str, api_base: str | None) -> str:
    """The model string LiteLLM gets: a bare id or an unknown first part with an api_base means openai/<model>."""
    if "://" in model:
        url = redact_url(model)
        raise LMConfigError(f"the model {url!r} is a URL: pass the server's URL as the api_base (--api-base) and the "
                            f"model it serves as the model (--lm), e.g. --lm openai/<model> --api-base {url}")
    provider, slash, rest = model.partition("/")
    if slash and (not provider or not rest.strip()):
        raise LMConfigError(f"model {model!r} needs a provider and a model name, e.g. openai/qwen2.5-7b-instruct")
    if slash and is_litellm_provider(provider):
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


def server_model(model: str, api_base: str | None) -> tuple[str, str | None]:
    """A provider model string and its (checked) server: ``(litellm model, api_base)``.

    Ollama's native API lives at the root, so a ``/v1`` suffix (its OpenAI shim) is dropped for it.
    """
    base = check_api_base(api_base) if api_base else None
    name = litellm_model(model, base)
    if base and name.partition("/")[0] in OLLAMA_PROVIDERS and base.endswith("/v1"):
        base = base.removesuffix("/v1")
    if base and not urlsplit(base).path and name.partition("/")[0] in ("openai", "hosted_vllm"):
        logger.warning("api_base %s has no path; OpenAI-compatible servers usually serve under /v1", base)
    return name, base
