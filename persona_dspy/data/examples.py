"""DSPy examples for a user: test queries, and past interactions for test-time alignment.

Every example carries the ``scope`` its answer may draw on (see ``persona_dspy.memory.retrieval``), so
the same program can be evaluated and aligned without any leakage: a test query sees its own
profile; a past interaction sees only what came strictly before it.
"""

from __future__ import annotations

import dspy

from persona_dspy.data.records import UserHistory
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import get_task


def query_examples(history: UserHistory) -> list[dspy.Example]:
    """The user's test queries with their golds."""
    return [
        dspy.Example(query=q.input, scope=MemoryScope.for_query(history.user_id, q), answer=q.gold,
                     user_id=history.user_id, example_id=q.id).with_inputs("query", "scope")
        for q in history.queries
    ]


def interaction_examples(history: UserHistory, n: int = 3) -> list[dspy.Example]:
    """The user's ``n`` most recent interactions before their earliest query, asked again in the task's format."""
    spec = get_task(history.task)
    return [
        dspy.Example(query=spec.interaction_prompt(item.fields), scope=MemoryScope.for_interaction(history, item),
                     answer=item.label, user_id=history.user_id, example_id=item.id).with_inputs("query", "scope")
        for item in history.recent_interactions(n)
    ]
