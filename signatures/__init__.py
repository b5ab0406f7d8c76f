"""DSPy signatures: what each LM call of persona-dspy means. Depends on dspy only.

Names are re-exported on first use, so that reading a label list or a task name (``signatures.labels``) does not
import dspy: the command line answers ``--help`` and data errors without it.
"""

import importlib
from typing import Any

_EXPORTS = {"LABELS": "labels", "label_list": "labels", "PersonaSummary": "persona", "PersonaUpdate": "persona",
            "TextualLoss": "persona", "compose_persona": "persona", "TASK_SIGNATURES": "task_signatures",
            "task_signature": "task_signatures", "demo_signature": "task_signatures"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
