"""Where one question may look in a user's memory: the leakage rules, in one place.

A ``MemoryScope`` is built from the records: a test query sees exactly its own profile; a past interaction
(answered during alignment) sees only what came strictly before it, never itself. Memory searches take a scope,
so these rules hold for every retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from persona_dspy.data.records import HistoryItem, Query, UserHistory


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
