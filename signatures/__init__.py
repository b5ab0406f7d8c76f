"""DSPy signatures: what each LM call of persona-dspy means. Depends on dspy only."""

from signatures.labels import LABELS, label_list
from signatures.persona import PersonaSummary, PersonaUpdate, TextualLoss, compose_persona
from signatures.tasks import TASK_SIGNATURES, task_signature

__all__ = ["LABELS", "TASK_SIGNATURES", "PersonaSummary", "PersonaUpdate", "TextualLoss", "compose_persona",
           "label_list", "task_signature"]
