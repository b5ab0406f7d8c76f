"""Retrieval from a user's episodic memory: a DSPy module and a plain tool function for agents.

A ``MemoryScope`` says where one question may look. It is built from the records, so the
leakage rules live here once: a test query sees exactly its own profile; a past interaction
(answered during alignment) sees only what came strictly before it, never itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import dspy

from persona_dspy.memory import EpisodicMemory, Passage, SearchMode
from persona_dspy.records import HistoryItem, Query, UserHistory


@dataclass(frozen=True)
class MemoryScope:
    """The part of one user's memory a question may use."""

    user_id: str
    before: datetime | None = None
    exclude_ids: tuple[str, ...] = ()
    within_ids: frozenset[str] | None = None

    @classmethod
    def for_query(cls, user_id: str, query: Query) -> MemoryScope:
        """A test query: its own profile and nothing else."""
        return cls(user_id, before=query.before, exclude_ids=(query.id,), within_ids=query.profile_ids)

    @classmethod
    def for_interaction(cls, history: UserHistory, item: HistoryItem) -> MemoryScope:
        """A past interaction answered again (alignment): strictly earlier items only."""
        earlier = frozenset(it.id for it in history.items_before(item))
        return cls(history.user_id, before=item.date, exclude_ids=(item.id,), within_ids=earlier)


def search_scope(memory: EpisodicMemory, scope: MemoryScope, query: str, k: int,
                 mode: SearchMode = "auto") -> list[Passage]:
    """The ``k`` passages of the scope's user most relevant to ``query``, within the scope."""
    return memory.search(scope.user_id, query, k, scope.before, exclude_ids=scope.exclude_ids,
                         within_ids=scope.within_ids, mode=mode)


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


def memory_search_tool(memory: EpisodicMemory, scope: MemoryScope, k: int = 5,
                       mode: SearchMode = "auto") -> Callable[[str], str]:
    """A tool bound to one user's scope, for ``dspy.ReAct`` or any agent: it cannot see other users."""

    def search_user_history(query: str) -> str:
        """Search this user's own past interactions (items and how the user labeled or rated them).

        Use short keyword queries about the topic of the current question.
        """
        if not query or not query.strip():
            return "(empty query: say what to look for)"
        return render_passages(search_scope(memory, scope, query, k, mode))

    return search_user_history
