"""persona-dspy: PersonaAgent (arXiv 2506.06254) as DSPy programs.

Per-user episodic memory in Qdrant, a persona (semantic memory) that conditions the agent's
answers, and test-time alignment of that persona as an optimizable instruction.

Sub-packages by concern, lowest first; a package imports only from those before it:
``data`` (records, loaders, scopes) -> ``memory`` (episodic memory, embeddings, retrieval) -> ``lm`` (building and
describing LMs) -> ``agent`` (PersonaAgent, semantic memory, answer mapping) -> ``programs`` (program files) ->
``evaluation`` (metrics, evaluation, reports) -> ``jobs`` (align, compile, compare, tune) -> ``cli``.
``files`` (atomic writes) sits below them all; ``testing`` (the offline stand-in LM) is test support that only
``--lm offline`` loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


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


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 user"``, ``"3 users"``: every count the package prints goes through here, so none reads "1 users"."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def show_progress(progress: bool | None) -> bool:
    """The one rule for progress bars: as asked (``--progress/--no-progress``), else on a terminal only."""
    if progress is not None:
        return progress
    import sys

    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "user") -> Any:
    """A tqdm bar on stderr following ``show_progress`` (a disabled bar when off, so callers need no branches)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(progress), dynamic_ncols=True)


def home() -> Any:
    """``$PERSONA_DSPY_HOME`` (default ``~/.persona_dspy``): memory, programs, reports and models live under it."""
    import os
    from pathlib import Path

    return Path(os.environ.get("PERSONA_DSPY_HOME") or Path.home() / ".persona_dspy").expanduser()
