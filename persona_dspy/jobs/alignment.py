"""Aligning one user end to end: initial persona from semantic memory, then PersonaAligner on recent interactions.

The many-user compile, the optimizer comparison and the tuning objective all align users this way.
"""

from __future__ import annotations

from typing import Any

import dspy

from optimizers.persona_aligner import PersonaAligner
from persona_dspy.agent.persona_agent import AgentMode, PersonaAgent
from persona_dspy.agent.semantic_memory import initial_agent
from persona_dspy.data.examples import interaction_examples
from persona_dspy.data.records import UserHistory
from persona_dspy.evaluation.metrics import dspy_metric
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.memory.retrieval import searches_reused

DEFAULT_RECENT = 3


def align_user(history: UserHistory, memory: EpisodicMemory, *, mode: AgentMode = "rag", k: int = 5,
               n_recent: int = DEFAULT_RECENT, optimizer_lm: dspy.LM | None = None,
               start: PersonaAgent | None = None, **aligner_settings: Any) -> PersonaAgent:
    """Align one user's persona on their ``n_recent`` latest interactions; ``start`` warm-starts from a program."""
    trainset = interaction_examples(history, n_recent)
    if not trainset:
        raise ValueError(f"user {history.user_id!r} has no history before their first query to align on")
    student = start if start is not None else initial_agent(history, memory, mode=mode, k=k)
    aligner = PersonaAligner(dspy_metric(history.task), optimizer_lm=optimizer_lm, **aligner_settings)
    with searches_reused():  # every iteration answers the same interactions: each is retrieved once, up front
        student.retrieve_ahead(example.inputs() for example in trainset)
        return aligner.compile(student, trainset=trainset)
