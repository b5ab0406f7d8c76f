"""Data: LaMP/OPPU loaders, per-user records, the task registry, DSPy examples, and memory scopes.

Owns what a user's history is and the leakage rules over it (``scope``). Imports nothing from the rest of
``persona_dspy`` but ``files``.
"""

from persona_dspy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "DataError": "lamp", "load_dataset": "lamp", "load_lamp": "lamp", "load_oppu": "lamp",
    "HistoryItem": "records", "Query": "records", "UserHistory": "records", "MemoryScope": "scope",
    "get_task": "tasks",
})
