"""Retrieval from a user's episodic memory: a DSPy module and a plain tool function for agents.

Every search goes through a ``MemoryScope`` (``persona_dspy.data.scope``), so no question sees beyond what the
leakage rules allow it. Within ``searches_reused()`` (one user's alignment) a search repeated with the same memory,
scope, query, k and mode returns the passages the first one found: the aligner answers the same interactions again
in every iteration, and their retrieval does not depend on the persona.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import dspy

from persona_dspy.data.scope import MemoryScope
from persona_dspy.memory.episodic import EpisodicMemory, Passage, SearchMode

_REUSED = "persona_dspy_reused_searches"
"""The dspy context setting holding the searches made in a ``searches_reused()`` block (threads copying it share it)."""


@contextmanager
def searches_reused() -> Iterator[None]:
    """Within the block, a repeated search returns the first one's passages (an enclosing block's, when nested).

    Only for a block in which the memory does not change (an alignment reads it and never writes).
    """
    if dspy.settings.get(_REUSED) is not None:
        yield
        return
    with dspy.context(**{_REUSED: {}}):
        yield


def search_scope(memory: EpisodicMemory, scope: MemoryScope, query: str, k: int,
                 mode: SearchMode = "auto") -> list[Passage]:
    """The ``k`` passages of the scope's user most relevant to ``query``, within the scope."""
    reused = dspy.settings.get(_REUSED)
    key = (id(memory), scope, query, k, mode)
    if reused is not None and key in reused:
        return list(reused[key][1])
    passages = memory.search(scope.user_id, query, k, scope.before, exclude_ids=scope.exclude_ids,
                             within_ids=scope.within_ids, mode=mode)
    if reused is not None:
        reused[key] = (memory, tuple(passages))  # the memory is kept so its id cannot name another one meanwhile
    return passages


def render_passages(passages: list[Passage]) -> str:
    """Passages as numbered lines for a prompt; says so plainly when nothing was found."""
    if not passages:
        return "(nothing relevant in this user's history)"
    return "\n".join(f"{i}. {p.render()}" for i, p in enumerate(passages, 1))


class MemoryRetrieval(dspy.Module):
    """Retrieve passages (fields and labels) from one user's episodic memory, within a scope."""

    def __init__(self, memory: EpisodicMemory, k: int = 5, mode: SearchMode = "auto") -> None:
        super().__init__()
        self.memory = memory
        self.k = k
        self.mode = mode

    def forward(self, query: str, scope: MemoryScope, k: int | None = None) -> dspy.Prediction:
        passages = search_scope(self.memory, scope, query, k or self.k, self.mode)
        return dspy.Prediction(passages=passages, context=render_passages(passages))


MEMORY_TOOL_NAME = "search_user_history"
"""The memory tool's name as ReAct lists it (and as program files record a react agent's built-in tools)."""

_CURRENT_SCOPE: ContextVar[MemoryScope | None] = ContextVar("persona_dspy_memory_scope", default=None)


@contextmanager
def memory_scope(scope: MemoryScope) -> Iterator[None]:
    """Make ``scope`` the one an unbound memory tool searches while a question is answered (thread- and task-local).

    A context variable, not an attribute of the tool: one agent answers many users' questions, in parallel.
    """
    token = _CURRENT_SCOPE.set(scope)
    try:
        yield
    finally:
        _CURRENT_SCOPE.reset(token)


def memory_search_tool(memory: EpisodicMemory, scope: MemoryScope | None = None, k: int = 5,
                       mode: SearchMode = "auto") -> Callable[[str], str]:
    """The memory-search tool for ``dspy.ReAct`` or any agent; it never sees beyond one user's scope.

    With ``scope`` it is bound to that scope; without, it searches the scope set by ``memory_scope`` for the question
    being answered (what PersonaAgent does), and says so when none is set.
    """

    def search_user_history(query: str) -> str:
        """Search this user's own past interactions (items and how the user labeled or rated them).

        Use short keyword queries about the topic of the current request.
        """
        current = scope if scope is not None else _CURRENT_SCOPE.get()
        if current is None:
            return "(no user is in scope: the memory tool only works while the agent answers a question)"
        if not query or not query.strip():
            return "(empty query: say what to look for)"
        return render_passages(search_scope(memory, current, query, k, mode))

    search_user_history.__name__ = MEMORY_TOOL_NAME
    return search_user_history
