"""The memory on a Qdrant server (qdrant-client with a URL), behind the same interface as the Edge store.

A server handles one collection for many tenants well and many thousands of collections badly, so each
namespace is one collection, ``<namespace>__shared``, with a tenant index (``is_tenant``) on ``user_id``
and a float index on ``ts``. Every request carries the user's condition; BM25 statistics stay per user
through ``SearchParams(idf=IdfCorpusParams(corpus=<user filter>))`` (a shard-wide IDF changed the top-5 of
77 of 93 LaMP_2N queries), which needs a server and qdrant-client that know corpus IDF (1.20).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR, SparseVectorData
from persona_dspy.memory.store import Hit, MemoryStoreError, SearchFilter, StoredPoint, VectorSpec

logger = logging.getLogger(__name__)

SUFFIX = "__shared"


def _vector(vec: object) -> object:
    return qm.SparseVector(indices=vec.indices, values=vec.values) if isinstance(vec, SparseVectorData) else vec


def from_vectors(vectors: object) -> dict[str, SparseVectorData | list[float]]:
    out: dict[str, SparseVectorData | list[float]] = {}
    for name, vec in (vectors if isinstance(vectors, dict) else {}).items():
        out[name] = SparseVectorData(list(vec.indices), list(vec.values)) if isinstance(vec, qm.SparseVector) \
            else list(vec)
    return out


class ServerStore:
    """One shared, tenant-indexed collection per namespace on a Qdrant server."""

    kind = "server"

    def __init__(self, client: QdrantClient, location: str) -> None:
        self.client = client
        self.location = location
        self._specs: dict[str, VectorSpec] = {}

    @classmethod
    def connect(cls, url: str, api_key: str | None = None) -> ServerStore:
        return cls(QdrantClient(url=url, api_key=api_key), url)

    @staticmethod
    def _user(user_id: str) -> qm.FieldCondition:
        return qm.FieldCondition(key="user_id", match=qm.MatchValue(value=user_id))

    def spec(self, namespace: str) -> VectorSpec | None:
        if namespace in self._specs:
            return self._specs[namespace]
        name = namespace + SUFFIX
        if not self.client.collection_exists(name):
            return None
        params = self.client.get_collection(name).config.params
        dense = params.vectors.get(DENSE_VECTOR) if isinstance(params.vectors, dict) else None
        spec = VectorSpec(bool(params.sparse_vectors) and SPARSE_VECTOR in params.sparse_vectors,
                          dense.size if dense is not None else None)
        self._specs[namespace] = spec
        return spec

    def ensure(self, namespace: str, spec: VectorSpec) -> None:
        if self.spec(namespace) is not None:
            return
        name = namespace + SUFFIX
        dense = {DENSE_VECTOR: qm.VectorParams(size=spec.dense_size, distance=qm.Distance.COSINE)} \
            if spec.dense_size else {}
        sparse = {SPARSE_VECTOR: qm.SparseVectorParams(modifier=qm.Modifier.IDF)} if spec.sparse else None
        self.client.create_collection(name, vectors_config=dense, sparse_vectors_config=sparse)
        self.client.create_payload_index(name, "user_id", field_schema=qm.KeywordIndexParams(
            type=qm.KeywordIndexType.KEYWORD, is_tenant=True))
        self.client.create_payload_index(name, "ts", field_schema=qm.PayloadSchemaType.FLOAT)
        self._specs[namespace] = spec

    def retrieve(self, namespace: str, user_id: str, ids: list[str]) -> dict[str, dict]:
        if self.spec(namespace) is None:
            return {}
        found = self.client.retrieve(namespace + SUFFIX, ids=ids, with_payload=True, with_vectors=False)
        return {str(p.id): p.payload for p in found if (p.payload or {}).get("user_id") == user_id}

    def upsert(self, namespace: str, user_id: str, points: list[StoredPoint]) -> None:
        if any(p.payload.get("user_id") != user_id for p in points):
            raise MemoryStoreError(f"points written for user {user_id!r} must carry that user_id")
        self.client.upsert(namespace + SUFFIX, wait=True, points=[
            qm.PointStruct(id=p.id, payload=p.payload, vector={n: _vector(v) for n, v in p.vectors.items()})
            for p in points])

    def query(self, namespace: str, user_id: str, vectors: dict[str, object], flt: SearchFilter, limit: int,
              depth: int, rrf_k: int) -> list[Hit]:
        if self.spec(namespace) is None:
            return []
        must: list[qm.Condition] = [self._user(user_id)]
        if flt.before_ts is not None:
            must.append(qm.FieldCondition(key="ts", range=qm.Range(lt=flt.before_ts)))
        if flt.within is not None:
            must.append(qm.HasIdCondition(has_id=sorted(flt.within)))
        must_not = [qm.HasIdCondition(has_id=sorted(flt.exclude))] if flt.exclude else None
        query_filter = qm.Filter(must=must, must_not=must_not)
        per_user_idf = qm.SearchParams(idf=qm.IdfCorpusParams(corpus=qm.Filter(must=[self._user(user_id)])))
        legs = [(_vector(vec), using, per_user_idf if using == SPARSE_VECTOR else qm.SearchParams(exact=True))
                for using, vec in vectors.items()]
        name = namespace + SUFFIX
        if len(legs) == 1:
            (vector, using, params), = legs
            response = self.client.query_points(name, query=vector, using=using, query_filter=query_filter,
                                                search_params=params, limit=limit, with_payload=True)
        else:
            prefetch = [qm.Prefetch(query=vector, using=using, filter=query_filter, params=params, limit=depth)
                        for vector, using, params in legs]
            response = self.client.query_points(name, prefetch=prefetch, query=qm.RrfQuery(rrf=qm.Rrf(k=rrf_k)),
                                                limit=limit, with_payload=True)
        return [Hit(str(p.id), p.payload or {}, float(p.score)) for p in response.points]

    def delete_user(self, namespace: str, user_id: str) -> None:
        if self.spec(namespace) is not None:
            self.client.delete(namespace + SUFFIX, points_selector=qm.FilterSelector(
                filter=qm.Filter(must=[self._user(user_id)])), wait=True)

    def count(self, namespace: str, user_id: str | None = None) -> int:
        if self.spec(namespace) is None:
            return 0
        flt = qm.Filter(must=[self._user(user_id)]) if user_id is not None else None
        return self.client.count(namespace + SUFFIX, count_filter=flt, exact=True).count

    def users(self, namespace: str) -> list[str]:
        if self.spec(namespace) is None:
            return []
        facet = self.client.facet(namespace + SUFFIX, key="user_id", limit=1 << 30, exact=True)
        return sorted(str(hit.value) for hit in facet.hits)

    def namespaces(self) -> list[str]:
        return sorted(c.name[:-len(SUFFIX)] for c in self.client.get_collections().collections
                      if c.name.endswith(SUFFIX))

    def scroll(self, namespace: str, user_id: str, batch: int, with_vectors: bool) -> Iterator[list[StoredPoint]]:
        if self.spec(namespace) is None:
            return
        offset = None
        while True:
            points, offset = self.client.scroll(namespace + SUFFIX, scroll_filter=qm.Filter(must=[self._user(user_id)]),
                                                limit=batch, offset=offset, with_payload=True,
                                                with_vectors=with_vectors)
            yield [StoredPoint(str(p.id), p.payload or {}, from_vectors(p.vector) if with_vectors else {})
                   for p in points]
            if offset is None:
                return

    def close(self) -> None:
        self.client.close()
