"""How well memory retrieval alone predicts a user's answer: a k-nearest vote over retrieved items.

This is ``persona-dspy retrieval-eval``'s report and the memory benchmark's quality table.
For each query, its own profile (never the union of the user's profiles) is searched with the
query's content; the labels of the k items found vote (LaMP-3: the rounded mean of their scores).
Baselines: the k most recent profile items (recency) and the profile's most common label (majority).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from persona_dspy.agent.answers import vote
from persona_dspy.data.records import HistoryItem, Query, UserHistory, common_task
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import TaskKind, get_task
from persona_dspy.memory.episodic import EpisodicMemory, SearchMode
from persona_dspy.memory.retrieval import search_scope

STRATEGIES: tuple[str, ...] = ("recency", "majority", "bm25", "dense", "hybrid")
_SEARCH_MODES: dict[str, SearchMode] = {"bm25": "sparse", "dense": "dense", "hybrid": "hybrid"}


@dataclass
class QualityReport:
    """Scores of one strategy on one task; ``fallbacks`` counts queries where retrieval found nothing."""

    task: str
    strategy: str
    k: int
    queries: int
    scores: dict[str, float]
    fallbacks: int = 0

    def as_row(self) -> dict[str, object]:
        return {"task": self.task, "strategy": self.strategy, "k": self.k, "queries": self.queries,
                **{name: round(value, 4) for name, value in self.scores.items()}, "fallbacks": self.fallbacks}


def _profile(history: UserHistory, query: Query) -> list[HistoryItem]:
    return [it for it in history.items if it.id in query.profile_ids]


def predict_query(history: UserHistory, query: Query, strategy: str, k: int,
                  memory: EpisodicMemory | None = None) -> tuple[str | None, bool]:
    """(prediction, whether it fell back to the majority label because retrieval found nothing)."""
    spec = get_task(history.task)
    profile = _profile(history, query)
    labels_by_recency = [it.label for it in reversed(profile) if it.label is not None]
    majority = vote(labels_by_recency, TaskKind.CLASSIFICATION)  # most common label, ties to the most recent
    if strategy == "majority":
        return majority, False
    if strategy == "recency":
        return vote(labels_by_recency[:k], spec.kind), False
    if strategy not in _SEARCH_MODES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if memory is None:
        raise ValueError(f"strategy {strategy!r} needs a memory")
    hits = search_scope(memory, MemoryScope.for_query(history.user_id, query), spec.query_text(query.input), k,
                        _SEARCH_MODES[strategy])
    labels = [h.label for h in hits if h.label is not None]
    if not labels:
        return majority, True
    return vote(labels, spec.kind), False


def evaluate_retrieval(histories: Sequence[UserHistory], strategy: str, k: int = 5,
                       memory: EpisodicMemory | None = None) -> QualityReport:
    """Score one strategy over every query of every user (accuracy; MAE and RMSE for ratings)."""
    task = common_task(histories, "retrieval evaluation")
    spec = get_task(task)
    if spec.label_field is None:
        raise ValueError(f"{task} has no label field: a retrieval vote cannot be scored on it")
    pairs: list[tuple[str | None, str]] = []
    fallbacks = 0
    for history in histories:
        for query in history.queries:
            prediction, fell_back = predict_query(history, query, strategy, k, memory)
            fallbacks += fell_back
            pairs.append((prediction, query.gold))
    n = len(pairs)
    scores = {"accuracy": sum(p == g for p, g in pairs) / n}
    if spec.kind is TaskKind.RATING:
        errors = [abs(float(p) - float(g)) if p is not None else max(float(g) - 1, 5 - float(g)) for p, g in pairs]
        scores["mae"] = sum(errors) / n
        scores["rmse"] = math.sqrt(sum(e * e for e in errors) / n)
    return QualityReport(task, strategy, k, n, scores, fallbacks)
