"""A numpy mirror of one user's collection, for fast search in Qdrant's embedded local mode.

Local mode scores sparse vectors point by point in Python and evaluates filters point by point
(measured: ~17 ms p50 at 1k items, ~200 ms at 10k with BM25). A local store is exclusive to one
process (Qdrant locks the folder), so an in-process mirror of a user's points cannot go stale
from outside: it is rebuilt from Qdrant after every write to that user. Qdrant stays the store
and the server path is untouched. Scores follow Qdrant's own formulas (BM25 IDF over the whole
collection, cosine on normalised vectors, reciprocal-rank fusion ``1/(rank + k)``), and the tests check
the mirror's results against Qdrant's query_points on the same data.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from qdrant_client import QdrantClient

from persona_dspy.embeddings import DENSE_VECTOR, SPARSE_VECTOR, SparseVectorData

RRF_K = 60  # the constant of Cormack et al. (2009); Qdrant's default of 2 lets one list's top hit dominate


@dataclass
class SearchFilter:
    before_ts: float | None = None
    within: Collection[str] | None = None  # point ids
    exclude: Collection[str] = ()


class UserIndex:
    """One user's points as arrays: row i is point ``ids[i]``."""

    def __init__(self, ids: list[str], payloads: list[dict], sparse: list[SparseVectorData | None],
                 dense: list[list[float]] | None) -> None:
        self.ids = ids
        self.payloads = payloads
        self.row_of = {pid: i for i, pid in enumerate(ids)}
        self.ts = np.array([p.get("ts") if p.get("ts") is not None else np.nan for p in payloads], dtype=np.float64)
        self._postings: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sparse_docs = sum(v is not None for v in sparse)
        if any(v is not None for v in sparse):
            rows: dict[int, list[int]] = {}
            vals: dict[int, list[float]] = {}
            for row, vec in enumerate(sparse):
                if vec is None:
                    continue
                for term, value in zip(vec.indices, vec.values, strict=True):
                    rows.setdefault(term, []).append(row)
                    vals.setdefault(term, []).append(value)
            self._postings = {t: (np.array(rows[t], dtype=np.int64), np.array(vals[t], dtype=np.float64)) for t in rows}
        self.dense: np.ndarray | None = None
        if dense is not None and ids:
            matrix = np.asarray(dense, dtype=np.float32)
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            self.dense = matrix / np.where(norms == 0, 1, norms)

    def mask(self, flt: SearchFilter) -> np.ndarray:
        keep = np.ones(len(self.ids), dtype=bool)
        if flt.before_ts is not None:
            keep &= self.ts < flt.before_ts  # NaN (undated) compares False: left out
        if flt.within is not None:
            only = np.zeros(len(self.ids), dtype=bool)
            only[[self.row_of[p] for p in flt.within if p in self.row_of]] = True
            keep &= only
        for pid in flt.exclude:
            row = self.row_of.get(pid)
            if row is not None:
                keep[row] = False
        return keep

    def sparse_scores(self, query: SparseVectorData) -> tuple[np.ndarray, np.ndarray]:
        """(scores, matched): BM25 with IDF over the whole collection, as Qdrant's Modifier.IDF."""
        scores = np.zeros(len(self.ids), dtype=np.float64)
        matched = np.zeros(len(self.ids), dtype=bool)
        n = self._sparse_docs
        for term, value in zip(query.indices, query.values, strict=True):
            posting = self._postings.get(term)
            if posting is None:
                continue
            rows, vals = posting
            idf = math.log((n - len(rows) + 0.5) / (len(rows) + 0.5) + 1)
            scores[rows] += value * idf * vals
            matched[rows] = True
        return scores, matched

    def dense_scores(self, query: list[float]) -> np.ndarray:
        if self.dense is None:
            raise ValueError("this memory has no dense vectors")
        q = np.asarray(query, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        return self.dense @ (q / norm if norm else q)

    def ranked(self, using: str, vector: object, keep: np.ndarray, limit: int) -> list[tuple[int, float]]:
        if using == SPARSE_VECTOR:
            assert isinstance(vector, SparseVectorData)
            scores, matched = self.sparse_scores(vector)
            keep = keep & matched
        else:
            scores = self.dense_scores(vector).astype(np.float64)
        rows = np.nonzero(keep)[0]
        if rows.size == 0:
            return []
        picked = rows[np.argsort(-scores[rows], kind="stable")[:limit]]
        return [(int(r), float(scores[r])) for r in picked]

    def search(self, vectors: dict[str, object], flt: SearchFilter, limit: int, depth: int,
               rrf_k: int = RRF_K) -> list[tuple[dict, float]]:
        keep = self.mask(flt)
        if len(vectors) == 1:
            (using, vector), = vectors.items()
            return [(self.payloads[r], s) for r, s in self.ranked(using, vector, keep, limit)]
        fused: dict[int, float] = {}
        for using, vector in vectors.items():
            for rank, (row, _) in enumerate(self.ranked(using, vector, keep, depth)):
                fused[row] = fused.get(row, 0.0) + 1.0 / (rank + rrf_k)
        best = sorted(fused.items(), key=lambda pair: pair[1], reverse=True)[:limit]
        return [(self.payloads[r], s) for r, s in best]


class LocalIndexCache:
    """Mirrors of recently searched users' collections, rebuilt after writes (LRU-bounded)."""

    def __init__(self, client: QdrantClient, max_users: int = 64) -> None:
        self.client = client
        self.max_users = max_users
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, UserIndex] = OrderedDict()

    def invalidate(self, collection: str) -> None:
        with self._lock:
            self._indexes.pop(collection, None)

    def get(self, collection: str, conditions_filter) -> UserIndex:
        with self._lock:
            index = self._indexes.get(collection)
            if index is not None:
                self._indexes.move_to_end(collection)
                return index
            index = self._build(collection, conditions_filter)
            self._indexes[collection] = index
            while len(self._indexes) > self.max_users:
                self._indexes.popitem(last=False)
            return index

    def _build(self, collection: str, conditions_filter) -> UserIndex:
        ids: list[str] = []
        payloads: list[dict] = []
        sparse: list[SparseVectorData | None] = []
        dense: list[list[float]] = []
        has_dense = False
        offset = None
        while True:
            points, offset = self.client.scroll(collection, scroll_filter=conditions_filter, limit=2048,
                                                offset=offset, with_payload=True, with_vectors=True)
            for p in points:
                vectors = p.vector if isinstance(p.vector, dict) else {}
                ids.append(str(p.id))
                payloads.append(p.payload or {})
                sv = vectors.get(SPARSE_VECTOR)
                sparse.append(SparseVectorData(list(sv.indices), list(sv.values)) if sv is not None else None)
                if DENSE_VECTOR in vectors:
                    has_dense = True
                    dense.append(vectors[DENSE_VECTOR])
            if offset is None:
                break
        return UserIndex(ids, payloads, sparse, dense if has_dense else None)
