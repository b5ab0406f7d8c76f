"""A problem the user can fix, and which exceptions the command reports as one such line (exit 2, no traceback)."""

from __future__ import annotations

import sys


class CLIError(Exception):
    """A problem the user can fix; reported on one line, without a traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line: only the classes of modules already imported (none is imported here)."""
    classes: list[type[BaseException]] = [CLIError, ValueError]
    for module, name in (("dspy.utils.exceptions", "LMError"), ("persona_dspy.lm.local_server", "LocalServerError"),
                         ("persona_dspy.lm.models", "ModelError"),
                         ("persona_dspy.memory.embeddings", "EmbeddingModelError"),
                         ("persona_dspy.memory.episodic", "MemoryStoreError"),
                         ("persona_dspy.jobs.distributed", "RayNotInstalledError")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            classes.append(getattr(loaded, name))
    return tuple(classes)
