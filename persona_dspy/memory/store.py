"""What the two memory backends share: stored points, search filters, the store interface, tie order.

``EpisodicMemory`` embeds and validates; a ``MemoryStore`` (Qdrant Edge on disk, or a Qdrant server)
stores points under a namespace (one per task) and user, and searches them with the engine's own
scoring, filtering and fusion. Nothing here scores anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR, SparseVectorData

RRF_K = 60  # the constant of Cormack et al. (2009); Qdrant's default of 2 lets one list's top hit dominate


class MemoryStoreError(RuntimeError):
    """The store cannot serve the request as configured (locked folder, mismatched embeddings, old layout)."""


@dataclass(frozen=True)
class VectorSpec:
    """Which vectors a namespace holds: BM25 (sparse, IDF-weighted by the engine) and/or dense of a size."""

    sparse: bool
    dense_size: int | None

    def describe(self) -> str:
        return "+".join((["bm25"] if self.sparse else []) + ([f"dense{self.dense_size}"] if self.dense_size else []))

    def to_json(self) -> str:
        return json.dumps({"sparse": self.sparse, "dense_size": self.dense_size})

    @classmethod
    def from_json(cls, text: str) -> VectorSpec:
        data = json.loads(text)
        return cls(bool(data["sparse"]), data.get("dense_size"))


@dataclass(frozen=True)
class StoredPoint:
    """One point as stored: its id (a UUID string), payload and vectors by name."""

    id: str
    payload: dict
    vectors: dict[str, SparseVectorData | list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchFilter:
    """What a search may return: dated strictly before ``before_ts``; only ``within`` ids; never ``exclude`` ids."""

    before_ts: float | None = None
    within: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Hit:
    """A search result; ``id`` is a UUID string or ``uuid.UUID`` (one kind per store: both sort alike)."""

    id: object
    payload: dict
    score: float


class MemoryStore(Protocol):
    """A place that keeps points per (namespace, user) and searches them with Qdrant's engine."""

    location: str
    kind: str

    def spec(self, namespace: str) -> VectorSpec | None: ...

    def ensure(self, namespace: str, spec: VectorSpec) -> None: ...

    def retrieve(self, namespace: str, user_id: str, ids: list[str]) -> dict[str, dict]: ...

    def upsert(self, namespace: str, user_id: str, points: list[StoredPoint]) -> None: ...

    def query(self, namespace: str, user_id: str, vectors: dict[str, object], flt: SearchFilter, limit: int,
              depth: int, rrf_k: int) -> list[Hit]: ...

    def delete_user(self, namespace: str, user_id: str) -> None: ...

    def count(self, namespace: str, user_id: str | None = None) -> int: ...

    def users(self, namespace: str) -> list[str]: ...

    def namespaces(self) -> list[str]: ...

    def scroll(self, namespace: str, user_id: str, batch: int, with_vectors: bool) -> Iterator[list[StoredPoint]]: ...

    def close(self) -> None: ...


def search_ranked(store: MemoryStore, namespace: str, user_id: str, vectors: dict[str, object], flt: SearchFilter,
                  k: int, depth: int, rrf_k: int) -> list[Hit]:
    """The top ``k`` hits, equal scores ordered by point id, so results never depend on ``k``.

    The engine picks among tied points in its own order, so it is asked for one more hit than needed; while
    the tie at position k runs past what came back, it is asked for more, then ties are sorted by id.
    """
    limit = k + 1
    while True:
        hits = store.query(namespace, user_id, vectors, flt, limit, max(depth, limit), rrf_k)
        if len(hits) < limit or hits[-1].score != hits[k - 1].score:
            break
        limit *= 2
    return sorted(hits, key=lambda h: (-h.score, h.id))[:k]


VECTOR_NAMES = (SPARSE_VECTOR, DENSE_VECTOR)
