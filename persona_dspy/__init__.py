"""persona-dspy: PersonaAgent (arXiv 2506.06254) as DSPy programs.

Per-user episodic memory in Qdrant, a persona (semantic memory) that conditions the agent's answers, and test-time
alignment of that persona as an optimizable instruction. The public names below import on first use, so that the
command line starts without loading dspy.

Layers, lowest first (each imports only from those before it): ``signatures`` -> ``files``, ``console``, ``data``,
``memory``, ``lm``, ``outputs``, ``persona``, ``agent``, ``programs``, ``evaluation`` (the core) -> ``optimizers``
(teleprompters and losses) -> ``jobs`` -> ``cli``. ``testing`` holds the offline stand-in LM for tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "PersonaAgent": "agent.persona_agent",
    "PersonaAligner": "optimizers.persona_aligner",
    "TextualLossMetric": "optimizers.textual_loss",
    "persona_gepa": "optimizers.persona_gepa",
    "PersonaGuard": "persona.guard",
    "guard_program": "persona.guard",
    "EpisodicMemory": "memory.episodic",
    "UserHistory": "data.records",
    "load_dataset": "data.lamp",
    "build_lm": "lm.build",
    "LMConfig": "lm.config",
    "lm_config": "lm.config",
    "load_program": "programs",
    "save_program": "programs",
    "evaluate": "evaluation.evaluate",
    "compile_users": "jobs.compile",
    "CompileConfig": "jobs.compile_config",
}

__all__ = sorted(_PUBLIC)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` re-exporting ``exports`` (name -> submodule) on first use.

    Sub-packages re-export their public names this way so that importing one light module of a package (say
    ``persona_dspy.data.tasks``) does not import the heavy ones (dspy, qdrant, fastembed) beside it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__


__getattr__ = lazy_exports(__name__, _PUBLIC)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
