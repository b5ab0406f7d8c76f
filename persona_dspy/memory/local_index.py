"""A numpy mirror of one user's collection, for fast search in Qdrant's embedded local mode.

Local mode scores sparse vectors point by point in Python and evaluates filters point by point
(``benchmarks/memory.py`` measures both paths). A local store is exclusive to one process (Qdrant
locks the folder), and every memory on a folder in that process shares one client and one
``LocalIndexCache``, so the mirror cannot go stale: it is built once per user (from the writes of
the process that creates the collection, or by one scroll of Qdrant) and every write and delete
updates it in place. Qdrant stays the store and the server path is untouched. Scores follow
Qdrant's own formulas (BM25 IDF over the whole collection, cosine on normalised vectors,
reciprocal-rank fusion ``1/(rank + k)``); equal scores rank by point id. The tests check the
mirror's results against Qdrant's query_points on the same data.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
from qdrant_client import QdrantClient

from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR, SparseVectorData

RRF_K = 60  # the constant of Cormack et al. (2009); Qdrant's default of 2 lets one list's top hit dominate


@dataclass
class SearchFilter:
    before_ts: float | None = None
    within: Collection[str] | None = None  # point ids
    exclude: Collection[str] = ()


def _tiebreak(point_id: str) -> int:
    """60 bits of the point's UUID: a fixed order among equal scores, whatever order the rows were added in."""
    return int(point_id.replace("-", "")[:15], 16)


class UserIndex:
    """One user's points as arrays, updated in place by writes (row i is point ``ids[i]``).

    A replaced point leaves a dead row behind (``alive`` False) and gets a new row, so a write costs
    O(its own terms) instead of a rebuild. Each term's posting arrays are rebuilt lazily, only for
    query terms whose postings changed since the last search that used them.
    """

    def __init__(self, dense_size: int | None = None) -> None:
        self._lock = threading.RLock()
        self._reset(dense_size)

    def _reset(self, dense_size: int | None) -> None:
        self.ids: list[str] = []
        self.payloads: list[dict] = []
        self._sparse: list[SparseVectorData | None] = []
        self.row_of: dict[str, int] = {}
        self._alive = np.zeros(64, dtype=bool)
        self._ts = np.full(64, np.nan, dtype=np.float64)
        self._tiebreak = np.zeros(64, dtype=np.int64)  # from the point id: equal scores rank the same however built
        self._dense = np.zeros((64, dense_size), dtype=np.float32) if dense_size else None
        self._post_rows: dict[int, list[int]] = {}
        self._post_vals: dict[int, list[float]] = {}
        self._post_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._live_sparse = 0

    def __len__(self) -> int:
        """Live points (replaced points leave dead rows until the next compaction)."""
        return len(self.row_of)

    def _grow(self, need: int) -> None:
        if need <= len(self._alive):
            return
        size = max(need, 2 * len(self._alive))
        self._alive = np.concatenate([self._alive, np.zeros(size - len(self._alive), dtype=bool)])
        self._ts = np.concatenate([self._ts, np.full(size - len(self._ts), np.nan)])
        self._tiebreak = np.concatenate([self._tiebreak, np.zeros(size - len(self._tiebreak), dtype=np.int64)])
        if self._dense is not None:
            extra = np.zeros((size - self._dense.shape[0], self._dense.shape[1]), dtype=np.float32)
            self._dense = np.concatenate([self._dense, extra])

    def upsert(self, point_id: str, payload: dict, sparse: SparseVectorData | None,
               dense: list[float] | None) -> None:
        with self._lock:
            old = self.row_of.get(point_id)
            if old is not None:
                self._alive[old] = False
                if self._sparse[old] is not None:
                    self._live_sparse -= 1
                    for term in self._sparse[old].indices:
                        self._post_arrays.pop(term, None)
            row = len(self.ids)
            self._grow(row + 1)
            self.ids.append(point_id)
            self.payloads.append(payload)
            self._sparse.append(sparse)
            self.row_of[point_id] = row
            self._alive[row] = True
            self._tiebreak[row] = _tiebreak(point_id)
            ts = payload.get("ts")
            self._ts[row] = ts if ts is not None else np.nan
            if sparse is not None:
                self._live_sparse += 1
                for term, value in zip(sparse.indices, sparse.values, strict=True):
                    self._post_rows.setdefault(term, []).append(row)
                    self._post_vals.setdefault(term, []).append(value)
                    self._post_arrays.pop(term, None)
            if self._dense is not None and dense is not None:
                vector = np.asarray(dense, dtype=np.float32)
                norm = float(np.linalg.norm(vector))
                self._dense[row] = vector / norm if norm else vector
            if len(self.ids) > 64 and len(self.ids) > 2 * len(self.row_of):
                self._compact()

    def _compact(self) -> None:
        """Drop the dead rows replaced points left behind (a long-lived app rewriting items grows otherwise)."""
        live = sorted(self.row_of.values())
        points = [(self.ids[r], self.payloads[r], self._sparse[r],
                   self._dense[r].tolist() if self._dense is not None else None) for r in live]
        dense_size = self._dense.shape[1] if self._dense is not None else None
        self._reset(dense_size)
        self.bulk_load(points)

    def bulk_load(self, points: list[tuple[str, dict, SparseVectorData | None, list[float] | None]]) -> None:
        """Fill an empty index in one pass (the first search of a user): no per-point growth or cache work."""
        with self._lock:
            if self.ids:
                raise RuntimeError("bulk_load needs an empty index")
            if not points:
                return
            n = len(points)
            self._grow(n)
            for row, (pid, payload, sparse, _) in enumerate(points):
                self.ids.append(pid)
                self.payloads.append(payload)
                self._sparse.append(sparse)
                self.row_of[pid] = row
                if sparse is not None:
                    for term, value in zip(sparse.indices, sparse.values, strict=True):
                        self._post_rows.setdefault(term, []).append(row)
                        self._post_vals.setdefault(term, []).append(value)
            self._alive[:n] = True
            self._tiebreak[:n] = [_tiebreak(p[0]) for p in points]
            self._live_sparse = sum(p[2] is not None for p in points)
            self._ts[:n] = [p[1].get("ts") if p[1].get("ts") is not None else np.nan for p in points]
            if self._dense is not None and n:
                matrix = np.asarray([p[3] if p[3] is not None else np.zeros(self._dense.shape[1]) for p in points],
                                    dtype=np.float32)
                norms = np.linalg.norm(matrix, axis=1, keepdims=True)
                self._dense[:n] = matrix / np.where(norms == 0, 1, norms)

    def _posting(self, term: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The live rows holding ``term`` and their values (cached until the term's postings change)."""
        cached = self._post_arrays.get(term)
        if cached is None:
            rows = self._post_rows.get(term)
            if rows is None:
                return None
            rows_arr = np.asarray(rows, dtype=np.int64)
            vals_arr = np.asarray(self._post_vals[term], dtype=np.float64)
            live = self._alive[rows_arr]
            cached = (rows_arr[live], vals_arr[live])
            self._post_arrays[term] = cached
        return cached if cached[0].size else None

    def mask(self, flt: SearchFilter) -> np.ndarray:
        n = len(self.ids)
        keep = self._alive[:n].copy()
        if flt.before_ts is not None:
            keep &= self._ts[:n] < flt.before_ts  # NaN (undated) compares False: left out
        if flt.within is not None:
            only = np.zeros(n, dtype=bool)
            only[[self.row_of[p] for p in flt.within if p in self.row_of]] = True
            keep &= only
        for pid in flt.exclude:
            row = self.row_of.get(pid)
            if row is not None:
                keep[row] = False
        return keep

    def sparse_scores(self, query: SparseVectorData) -> tuple[np.ndarray, np.ndarray]:
        """(scores, matched): BM25 with IDF over the live collection, as Qdrant's Modifier.IDF."""
        n_rows = len(self.ids)
        scores = np.zeros(n_rows, dtype=np.float64)
        matched = np.zeros(n_rows, dtype=bool)
        n = self._live_sparse
        for term, value in zip(query.indices, query.values, strict=True):
            posting = self._posting(term)
            if posting is None:
                continue
            rows, vals = posting
            idf = math.log((n - len(rows) + 0.5) / (len(rows) + 0.5) + 1)
            scores[rows] += value * idf * vals
            matched[rows] = True
        return scores, matched

    def dense_scores(self, query: list[float]) -> np.ndarray:
        if self._dense is None:
            raise ValueError("this memory has no dense vectors")
        q = np.asarray(query, dtype=np.float32)
        norm = float(np.linalg.norm(q))
        return self._dense[:len(self.ids)] @ (q / norm if norm else q)

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
        picked = rows[np.lexsort((self._tiebreak[rows], -scores[rows]))[:limit]]
        return [(int(r), float(scores[r])) for r in picked]

    def search(self, vectors: dict[str, object], flt: SearchFilter, limit: int, depth: int,
               rrf_k: int = RRF_K) -> list[tuple[dict, float]]:
        with self._lock:
            return self._search(vectors, flt, limit, depth, rrf_k)

    def _search(self, vectors: dict[str, object], flt: SearchFilter, limit: int, depth: int,
                rrf_k: int) -> list[tuple[dict, float]]:
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
    """Mirrors of users' collections (LRU-bounded), shared by every memory on one client.

    Each collection has its own lock: a write (Qdrant upsert + mirror update), a delete and a
    mirror build for one user are serialized, so the mirror never misses a write or applies writes
    out of order, while other users' searches and writes go on (one user's scroll of 10k points
    does not hold everyone up).
    """

    def __init__(self, client: QdrantClient, max_users: int = 64) -> None:
        self.client = client
        self.max_users = max_users
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, UserIndex] = OrderedDict()
        self._collection_locks: dict[str, threading.RLock] = {}

    def collection_lock(self, collection: str) -> threading.RLock:
        with self._lock:
            return self._collection_locks.setdefault(collection, threading.RLock())

    def cached(self, collection: str) -> UserIndex | None:
        with self._lock:
            index = self._indexes.get(collection)
            if index is not None:
                self._indexes.move_to_end(collection)
            return index

    def _put(self, collection: str, index: UserIndex) -> None:
        with self._lock:
            self._indexes[collection] = index
            self._indexes.move_to_end(collection)
            while len(self._indexes) > self.max_users:
                self._indexes.popitem(last=False)

    def invalidate(self, collection: str) -> None:
        with self._lock:
            self._indexes.pop(collection, None)

    def start_empty(self, collection: str, dense_size: int | None) -> None:
        """Mirror a collection just created: writes fill it, so it never needs a scroll."""
        self._put(collection, UserIndex(dense_size))

    def apply_writes(self, collection: str, points: list[tuple[str, dict, dict[str, object]]]) -> None:
        """Bring a cached mirror up to date with points just written to Qdrant (id, payload, vectors).

        Call it under ``collection_lock(collection)``, held since before the Qdrant write.
        """
        index = self.cached(collection)
        if index is None:
            return  # not mirrored: the first search builds it from Qdrant, writes included
        for pid, payload, vectors in points:
            index.upsert(pid, payload, vectors.get(SPARSE_VECTOR), vectors.get(DENSE_VECTOR))

    def get(self, collection: str, scroll_filter: Callable[[], object]) -> UserIndex:
        index = self.cached(collection)
        if index is not None:
            return index
        with self.collection_lock(collection):  # writes to this user wait; other users do not
            index = self.cached(collection)
            if index is None:
                index = self._build(collection, scroll_filter())
                self._put(collection, index)
            return index

    def _build(self, collection: str, conditions_filter: object) -> UserIndex:
        params = self.client.get_collection(collection).config.params
        dense_cfg = params.vectors.get(DENSE_VECTOR) if isinstance(params.vectors, dict) else None
        index = UserIndex(dense_cfg.size if dense_cfg is not None else None)
        loaded: list[tuple[str, dict, SparseVectorData | None, list[float] | None]] = []
        offset = None
        while True:
            points, offset = self.client.scroll(collection, scroll_filter=conditions_filter, limit=2048,
                                                offset=offset, with_payload=True, with_vectors=True)
            for p in points:
                vectors = p.vector if isinstance(p.vector, dict) else {}
                sv = vectors.get(SPARSE_VECTOR)
                sparse = SparseVectorData(list(sv.indices), list(sv.values)) if sv is not None else None
                loaded.append((str(p.id), p.payload or {}, sparse, vectors.get(DENSE_VECTOR)))
            if offset is None:
                break
        index.bulk_load(loaded)
        return index
