"""OpenAI-compatible servers on dspy's native engine: the hot path of every compile.

dspy's native engine sends a request for a fraction of LiteLLM's client CPU, but its ``openai/`` route spells the
token limit ``max_completion_tokens``, which llama.cpp ignores. So the package registers one provider,
``openai-compatible``, in the dialect llama.cpp, vLLM and SGLang read (``max_tokens``, ``response_format`` as is);
timeouts, retries and errors are dspy's own. A program file records such an LM as ``openai-compatible/<model>``:
loading it needs this module imported, as any dspy program needs its providers registered.
Every HTTP request goes through ``lm.attempts``: counted (retries included), timed per server, and hedged on a
server the run watches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dspy
from dspy.clients.base_lm import LM_CLASS_STATE_KEY
from dspy.lm15 import (
    AccessPolicy,
    AsyncOpenAIChatLM,
    EndpointSupport,
    ModelSupport,
    OpenAIChatCompat,
    OpenAIChatLM,
    ProviderDefinition,
    ProviderError,
    register_provider,
)
from dspy.utils.exceptions import LMTimeoutError, LMTransportError

from persona_dspy.lm.attempts import cancellable, send
from persona_dspy.lm.cancel import check_allowed
from persona_dspy.lm.usage import active_request_counters, count_request, mark_counted

PROVIDER = "openai-compatible"
"""The provider id dspy routes ``openai-compatible/<model>`` to (a LiteLLM-free spelling: none of its prefixes)."""
NATIVE_PREFIXES = frozenset({"openai", "hosted_vllm"})
"""Model prefixes that, with an api_base, name an OpenAI-compatible server this module serves natively."""

COMPAT = OpenAIChatCompat(
    instruction_role="system",
    max_tokens_field="max_tokens",  # llama.cpp reads only this; vLLM and SGLang read both
    stream_usage="include",
    thinking_format="none",  # a reasoning setting is dropped, never sent in a dialect the server may refuse
    tool_result_name="omit",
    strict_tools="omit",
    cache_control="none",
    json_schema="send",  # llama.cpp, vLLM and SGLang decode under the schema
)
_ACCESS = AccessPolicy(provider=PROVIDER, supports=EndpointSupport(complete=True, stream=True), auth_modes=("bearer",),
                       base_url="http://127.0.0.1:8080/v1")


def _error_sizes(body: str) -> str:
    """The sizes llama.cpp's context-overflow reply carries beside its message (``n_prompt_tokens``, ``n_ctx``).

    lm15 keeps only an error's message; these are what tells the user how far over the context the prompt was.
    """
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    sizes = [f"{key}={error[key]}" for key in ("n_prompt_tokens", "n_ctx") if isinstance(error.get(key), int)]
    return f" ({', '.join(sizes)})" if sizes else ""


def _with_sizes(error: ProviderError, body: str) -> ProviderError:
    extra = _error_sizes(body)
    if extra:
        error.message = f"{error.message}{extra}"
        error.args = (error.message, *error.args[1:])
    return error


class _ChatLM(OpenAIChatLM):
    """lm15's adapter, sending each HTTP request through ``lm.attempts`` (counted, timed, hedged)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.transport = cancellable(self.transport)

    def _send(self, request: Any) -> Any:
        return send(self.base_url, super()._send, request)

    def _stream_raw(self, request: Any, req: Any = None) -> Iterator[Any]:
        counters, failure = active_request_counters(), None
        try:
            yield from super()._stream_raw(request, req)
        except ProviderError:
            failure = "http_error"
            raise
        except Exception as exc:
            failure = "timeout" if "timeout" in type(exc.__cause__ or exc).__name__.lower() else "connection"
            mark_counted(exc)
            raise
        finally:
            count_request(counters, failure)

    def _http_error(self, response: Any) -> ProviderError:
        return mark_counted(super()._http_error(response))

    def normalize_error(self, status: int, body: str) -> ProviderError:
        return _with_sizes(super().normalize_error(status, body), body)

    def complete(self, request: Any) -> Any:
        check_allowed(self.base_url)  # a server being stopped (``lm.cancel``): dspy must not retry into it
        return super().complete(request)

    def stream(self, request: Any) -> Any:
        check_allowed(self.base_url)
        return super().stream(request)


class _AsyncChatLM(AsyncOpenAIChatLM):
    """Async calls: each request counted (not hedged: the package's runs call LMs from threads)."""

    async def _send(self, request: Any) -> Any:
        counters = active_request_counters()
        try:
            response = await super()._send(request)
        except Exception as exc:
            count_request(counters, "timeout" if "timeout" in type(exc.__cause__ or exc).__name__.lower()
                          else "connection")
            mark_counted(exc)
            raise
        count_request(counters, "http_error" if response.status >= 400 else None)
        return response

    def normalize_error(self, status: int, body: str) -> ProviderError:
        error = _with_sizes(super().normalize_error(status, body), body)
        return mark_counted(error) if status >= 400 else error


# ProviderDefinition.chat(...) with the dialect's classes extended to keep an overflow's sizes
DEFINITION = ProviderDefinition(id=PROVIDER, dialect="openai-chat", adapter=_ChatLM, async_adapter=_AsyncChatLM,
                                access=_ACCESS, compat=COMPAT, placeholder_key="local",
                                note="an OpenAI-compatible server (llama.cpp, vLLM, SGLang): max_tokens")
register_provider(DEFINITION, supports=ModelSupport(function_calling=False, reasoning=False, response_schema=True))


class ServerLM(dspy.LM):
    """A ``dspy.LM`` on the native engine for one OpenAI-compatible server.

    ``structured`` says whether dspy's JSONAdapter may send it a JSON schema (``lm.adapters``); ``served_as`` is the
    model string as given (``openai/qwen``), which reports show. Saved as a plain ``dspy.LM`` (see module docstring).
    """

    def __init__(self, model: str, *, served_as: str, structured: bool = True, **kwargs: Any) -> None:
        super().__init__(f"{PROVIDER}/{model}", engine="lm15", **kwargs)
        self.served_as = served_as
        self.structured = structured

    @property
    def supports_response_schema(self) -> bool:
        return self.structured

    @property
    def supported_params(self) -> set[str]:
        """dspy's answer, read once: it depends on the provider's declaration only, and costs ~0.5 ms per call."""
        params = self.__dict__.get("_supported_params")
        if params is None:
            params = self.__dict__["_supported_params"] = frozenset(super().supported_params)
        return set(params)

    def dump_state(self) -> dict[str, Any]:
        return {**super().dump_state(), LM_CLASS_STATE_KEY: "dspy.clients.lm.LM"}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _timeouts_as_timeouts(self):
            return super().__call__(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        with _timeouts_as_timeouts(self):
            return await super().acall(*args, **kwargs)


@contextmanager
def _timeouts_as_timeouts(lm: ServerLM) -> Iterator[None]:
    """A request that timed out raises ``LMTimeoutError``, as through LiteLLM (lm15 calls it a transport error).

    dspy has already retried it by then (both are retryable); only the class and the message change.
    """
    try:
        yield
    except LMTransportError as exc:
        cause: BaseException | None = exc
        while cause is not None and not (isinstance(cause, TimeoutError) or type(cause).__name__.endswith("Timeout")):
            cause = cause.__cause__
        if cause is None:
            raise
        raise LMTimeoutError(f"no answer within the timeout of {lm.kwargs.get('timeout')} s ({exc.message})",
                             model=lm.served_as, provider=PROVIDER) from exc


def native_model(model: str) -> str | None:
    """The server's model id when ``model`` (``openai/qwen``, ``hosted_vllm/x``) is served natively, else None."""
    provider, _, rest = model.partition("/")
    return rest if provider in NATIVE_PREFIXES and rest else None
