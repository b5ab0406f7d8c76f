"""Free-text LM outputs that survive a reply the adapter cannot parse.

Feedback, persona updates and persona summaries are free text. When a (small) model's reply does not follow the
adapter's format, or is cut off by max_tokens, dspy raises ``AdapterParseError``; the reply usually still holds the
text that was meant. ``predict_text`` keeps it (``fallback`` says so, for the diagnostics) instead of failing the
whole alignment; a reply with nothing usable in it still raises.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

logger = logging.getLogger(__name__)

FALLBACK_UNPARSED = "unparsed reply: kept the field's text from the raw reply"


@dataclass(frozen=True)
class TextOutput:
    """One free-text output, and how it was obtained (``fallback`` is None when the adapter parsed the reply)."""

    text: str
    fallback: str | None = None


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


def predict_text(predictor: dspy.Module, field: str, **inputs: Any) -> TextOutput:
    """Run ``predictor`` for one free-text output ``field``, keeping the raw reply's text when it cannot be parsed."""
    try:
        return TextOutput(str(getattr(predictor(**inputs), field)).strip())
    except AdapterParseError as exc:
        text = field_text_from_response(exc.lm_response, field)
        if not text:
            raise
        logger.info("unparsable reply for %s: kept its text (%d chars)", field, len(text))
        return TextOutput(text, FALLBACK_UNPARSED)
