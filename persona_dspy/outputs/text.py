"""Free-text LM outputs that survive a reply the adapter cannot parse.

Feedback, persona updates and persona summaries are free text. When a (small) model's reply does not follow the
adapter's format, or is cut off by max_tokens, dspy raises ``AdapterParseError``; the reply usually still holds the
text that was meant. ``predict_text`` keeps it (``fallback`` says so, for the diagnostics) instead of failing the
whole alignment.

Whatever way it was read, the text is then validated (``persona_dspy.outputs.validation.rejection``: not empty, not a
placeholder, not the prompt or the signature's instructions repeated). A rejected text is asked for once more (at a
non-zero temperature, past the cache: the same request would get the same reply); when that is rejected too, the
output comes back with ``invalid`` set and no text, and the caller keeps what it had. Each check, rejection, retry
and fallback is counted for the step (``summary``, ``loss``, ``update``) in the active ``OutputStats``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from persona_dspy.outputs.budget import bounded_max_tokens
from persona_dspy.outputs.validation import record, rejection

logger = logging.getLogger(__name__)

FALLBACK_UNPARSED = "unparsed reply: kept the field's text from the raw reply"
RETRY_TEMPERATURE = 0.7


@dataclass(frozen=True)
class TextOutput:
    """One free-text output, and how it was obtained (``fallback`` is None when the adapter parsed the reply).

    ``invalid`` says why the text was rejected (then ``text`` is empty and must not be kept).
    """

    text: str
    fallback: str | None = None
    invalid: str | None = None


def _chat_field(text: str, field: str) -> str | None:
    found = re.search(rf"\[\[\s*##\s*{re.escape(field)}\s*##\s*\]\]\s*(.*?)(?=\[\[\s*##|\Z)", text, re.S)
    return found.group(1).strip() if found else None


def _json_field(text: str, field: str) -> str | None:
    try:
        value = json.loads(text)
        if isinstance(value, dict) and field in value:
            return str(value[field]).strip()
    except (ValueError, TypeError):
        pass
    # a JSON reply cut off by max_tokens: the field's string up to where it stops
    found = re.search(rf'"{re.escape(field)}"\s*:\s*"((?:[^"\\]|\\.)*)', text, re.S)
    if not found:
        return None
    try:
        return json.loads(f'"{found.group(1)}"').strip()
    except ValueError:  # cut inside an escape sequence
        return found.group(1).strip()


def field_text_from_response(response: object, field: str) -> str:
    """What a reply meant for ``field``: chat markers, a (possibly cut-off) JSON object, or else the plain text."""
    text = response if isinstance(response, str) else str(response or "")
    for extract in (_chat_field, _json_field):
        value = extract(text, field)
        if value is not None:
            return value
    return text.strip()


def _predict_once(predictor: dspy.Module, field: str, config: dict[str, Any], **inputs: Any) -> TextOutput:
    try:
        return TextOutput(str(getattr(predictor(**inputs, config=config), field)).strip())
    except AdapterParseError as exc:
        text = field_text_from_response(exc.lm_response, field)
        if not text:
            return TextOutput("", FALLBACK_UNPARSED, "an unparsable reply with no text in it")
        logger.info("unparsable reply for %s: kept its text (%d chars)", field, len(text))
        return TextOutput(text, FALLBACK_UNPARSED)


def instructions_of(predictor: Any) -> str:
    """The prompt text a reply must not merely repeat: the signature's instructions and field descriptions."""
    signature = getattr(predictor, "signature", None)
    if signature is None:
        return ""
    fields = {**signature.input_fields, **signature.output_fields}
    descriptions = [str((f.json_schema_extra or {}).get("desc", "")) for f in fields.values()]
    return "\n".join([signature.instructions, *descriptions])


def predict_text(predictor: dspy.Module, field: str, *, step: str = "text", config: dict[str, Any] | None = None,
                 copied_from: Sequence[str] = (), **inputs: Any) -> TextOutput:
    """Run ``predictor`` for one free-text output ``field``: read it even from an unparsable reply, validate it,
    retry a rejected one once (module docstring). ``copied_from``: texts the output must not copy (``rejection``)."""
    config = dict(config or {})
    signature = getattr(predictor, "signature", None)
    cap = bounded_max_tokens(signature, dspy.settings.lm) if signature is not None else None
    if cap is not None and "max_tokens" not in config:
        config["max_tokens"] = cap  # sized to the output (persona_dspy.outputs.budget)
    sources = instructions_of(predictor)
    output = _predict_once(predictor, field, config, **inputs)
    for attempt in (1, 2):
        reason = output.invalid or rejection(output.text, instructions=sources, copied_from=list(copied_from))
        record(step, checked=1, invalid=reason, fallback=output.fallback is not None, retry=reason is not None
               and attempt == 1)
        if reason is None:
            return output
        logger.warning("%s output rejected (attempt %d of 2): %s", step, attempt, reason)
        if attempt == 1:
            retry = {**config, "temperature": max(RETRY_TEMPERATURE, float(config.get("temperature") or 0.0)),
                     "rollout_id": random.randrange(1 << 30)}
            output = _predict_once(predictor, field, retry, **inputs)
    return TextOutput("", output.fallback, reason)
