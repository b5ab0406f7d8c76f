"""Which dspy adapter formats a call: JSON under the server's schema when the LM can decode under one, else chat.

Small models rarely follow ChatAdapter's ``[[ ## field ## ]]`` format; under a JSON schema (``response_format``)
the server's grammar makes every reply parse, and a ``Literal`` label field can only be one of its labels. Where the
LM cannot take a schema (the offline stand-in, Ollama through LiteLLM, unknown providers) calls go through dspy's
ChatAdapter.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import dspy


def decodes_under_schema(lm: Any) -> bool:
    """Whether dspy will send this LM a JSON schema (see ``lm.build._declare_response_schema``)."""
    try:
        return bool(getattr(lm, "supports_response_schema", False))
    except Exception:  # an LM whose capability lookup fails is treated as schema-less, as dspy does
        return False


class BoundedJSONAdapter(dspy.JSONAdapter):
    """dspy's JSONAdapter, plus the string length bounds of output fields (``max_length``) in the JSON schema.

    dspy builds the schema from the fields' types alone, so a bound declared on a field never reaches the server;
    under a schema that carries it, the server's grammar ends the string there.

    dspy also rebuilds the schema (a pydantic model) and the system message on every call, ~1 ms of client CPU per
    call; both depend on the signature alone, so each is built once per signature (and, for the schema, per what the
    LM takes) and reused while the signature lives.
    """

    def __init__(self) -> None:
        super().__init__()
        self._formats: WeakKeyDictionary[type, dict[tuple[bool, bool], Any]] = WeakKeyDictionary()
        self._system: WeakKeyDictionary[type, str] = WeakKeyDictionary()

    def format_system_message(self, signature: Any) -> str:
        message = self._system.get(signature)
        if message is None:
            message = self._system[signature] = super().format_system_message(signature)
        return message

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        takes = ("response_format" in lm.supported_params, bool(lm.supports_response_schema))
        known = self._formats.setdefault(signature, {})
        if takes not in known:
            self._bounded_response_format(lm, lm_kwargs, signature)
            known[takes] = lm_kwargs.get("response_format")
        if known[takes] is not None:
            lm_kwargs["response_format"] = known[takes]

    def _bounded_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        super()._prepare_response_format(lm, lm_kwargs, signature)
        model = lm_kwargs.get("response_format")
        if not (isinstance(model, type) and hasattr(model, "model_json_schema")):
            return
        schema = model.model_json_schema()
        for name, prop in schema.get("properties", {}).items():
            field = signature.output_fields.get(name)
            bound = next((m.max_length for m in getattr(field, "metadata", []) if hasattr(m, "max_length")), None)
            if bound is not None and prop.get("type") == "string":
                prop["maxLength"] = bound
        model.model_json_schema = lambda *args, **kwargs: schema


CHAT_STOP = ("[[ ## completed ## ]]",)
"""Where a chat-format reply ends: a small model that goes on past it only writes what nobody reads (to max_tokens).
The parser needs no closing marker."""


class StructuredAdapter(dspy.ChatAdapter):
    """ChatAdapter, except that LMs that decode under a JSON schema get dspy's JSONAdapter.

    ``chat`` formats the calls of schema-less LMs (default: a plain ChatAdapter, with its JSON retry), which stop at
    ChatAdapter's closing marker (``CHAT_STOP``; the JSON retry sends it too, which a JSON reply never contains).
    """

    def __init__(self, chat: dspy.ChatAdapter | None = None) -> None:
        super().__init__()
        self.chat = chat or dspy.ChatAdapter()
        self.json = BoundedJSONAdapter()

    def _pick(self, lm: Any, lm_kwargs: dict[str, Any]) -> tuple[dspy.Adapter, dict[str, Any]]:
        """The adapter, and the call's settings: chat-format replies stop at ChatAdapter's closing marker."""
        if decodes_under_schema(lm):
            return self.json, lm_kwargs
        return self.chat, {"stop": list(CHAT_STOP), **lm_kwargs}

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        adapter, lm_kwargs = self._pick(lm, lm_kwargs)
        return adapter(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                    inputs: dict[str, Any]) -> list[dict[str, Any]]:
        adapter, lm_kwargs = self._pick(lm, lm_kwargs)
        return await adapter.acall(lm, lm_kwargs, signature, demos, inputs)


STRUCTURED = StructuredAdapter()


def default_adapter() -> dspy.Adapter:
    """The adapter a job runs under: the caller's own when one is configured, else ``STRUCTURED``."""
    return dspy.settings.adapter or STRUCTURED
