"""max_tokens sized to what a call has to write, where the server enforces the output's bounds.

A rating needs a few tokens and a persona a few hundred; one max_tokens for every call lets a model that rambles run
each reply to the cap. Under a JSON schema the server's grammar bounds every string field that declares a
``max_length`` (``persona_dspy.lm.adapters.BoundedJSONAdapter``) and a ``Literal`` to its labels, so the reply's
size is known in advance: ``bounded_max_tokens`` is that size (3 characters per token, which over-counts, plus the
JSON around it), never above the LM's own max_tokens. For an LM without a schema, or an output without a bound (a
generated text), it says nothing and the LM's max_tokens applies.
"""

from __future__ import annotations

from typing import Any, Literal, get_origin

CHARS_PER_TOKEN = 3
FIELD_TOKENS = 16
"""Per field: its name, quotes and separators; also what a label takes."""
JSON_TOKENS = 32


def _bound(field: Any) -> int | None:
    return next((m.max_length for m in getattr(field, "metadata", []) or [] if hasattr(m, "max_length")), None)


def bounded_max_tokens(signature: Any, lm: Any) -> int | None:
    """The reply's largest size in tokens for ``signature`` on ``lm``, capped by its max_tokens; None if unknown."""
    if lm is None or not getattr(lm, "supports_response_schema", False):
        return None
    total = JSON_TOKENS
    for field in signature.output_fields.values():
        bound = _bound(field)
        if bound is not None:
            total += bound // CHARS_PER_TOKEN + FIELD_TOKENS
        elif get_origin(field.annotation) is Literal:
            total += FIELD_TOKENS
        else:
            return None
    own = (getattr(lm, "kwargs", None) or {}).get("max_tokens")
    return min(total, int(own)) if own else total
