"""Episodic memory: each user's past interactions in Qdrant, searched per user.

Where it lives:
- embedded local mode on disk (the default: a folder under the data directory, persists across
  processes), or ``":memory:"`` for tests;
- a Qdrant server by URL at scale, through the same code.

Collection layout (measured, see ``benchmarks/memory.py`` and the README): Qdrant's local mode
ignores payload indexes, so a user filter over one shared collection scans every point of every
user (about 145 ms at 10k points), while a collection per user answers in well under a millisecond.
Local mode therefore keeps one collection per user. A server indexes a tenant key
(``is_tenant=True``) and handles a shared collection well, and many thousands of collections badly,
so a server uses one shared collection filtered by ``user_id``. Both layouts run the same search code
and both are tested (the shared one in local mode too).

Isolation: every search names exactly one user, resolved to that user's collection or a mandatory
``user_id`` condition; there is no API that searches across users.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from persona_dspy.data.records import HistoryItem, UserHistory
from persona_dspy.memory.embeddings import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    Embedder,
    EmbeddingConfig,
    SparseVectorData,
)
from persona_dspy.memory.local_index import RRF_K, LocalIndexCache, SearchFilter

logger = logging.getLogger(__name__)

SearchMode = Literal["auto", "sparse", "dense", "hybrid"]
_POINT_NAMESPACE = uuid.UUID("7f1d3a52-52a4-4bd4-9f0e-6c1b3f5d2a10")


class MemoryStoreError(RuntimeError):
    """The store cannot serve the request as configured (locked folder, mismatched embeddings)."""


def task_namespace(task: str) -> str:
    """The collection prefix of a task's memories, e.g. ``pd_lamp_3``."""
    from persona_dspy.data.tasks import get_task

    return f"pd_{get_task(task).name.lower()}"


def default_memory_path() -> Path:
    """``$PERSONA_DSPY_HOME/memory`` (default ``~/.persona_dspy/memory``)."""
    home = os.environ.get("PERSONA_DSPY_HOME") or str(Path.home() / ".persona_dspy")
    return Path(home).expanduser() / "memory"


@dataclass(frozen=True)
class Passage:
    """One remembered interaction as retrieval returns it: its fields, its label and its score."""

    item_id: str
    text: str
    label: str | None
    date: str | None
    fields: dict[str, str] = field(default_factory=dict)
    score: float = 0.0

    def render(self) -> str:
        """A one-line form for prompts: date, text and what the user answered."""
        when = f"[{self.date[:10]}] " if self.date else ""
        answer = f" -> {self.label}" if self.label is not None else ""
        return f"{when}{self.text}{answer}"


def _timestamp(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@functools.lru_cache(maxsize=1 << 16)
def point_id(user_id: str, item_id: str) -> str:
    """A stable point id per (user, item): re-adding an item overwrites it instead of duplicating it."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{user_id}\x1f{item_id}"))


class CollectionLayout(Protocol):
    """Where a user's points live and how a search is confined to that user."""

    name: str

    def collection(self, user_id: str) -> str: ...

    def user_conditions(self, user_id: str) -> list[qm.Condition]: ...

    def prepare(self, client: QdrantClient, collection: str) -> None: ...

    def delete_user(self, client: QdrantClient, user_id: str) -> None: ...

    def owned_collections(self, client: QdrantClient) -> list[str]: ...


class PerUserCollections:
    """One collection per user: searches touch only that user's points (best for local mode)."""

    name = "per_user"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def collection(self, user_id: str) -> str:
        digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24]
        return f"{self.prefix}__u_{digest}"

    def user_conditions(self, user_id: str) -> list[qm.Condition]:
        # The collection already confines the search; the condition guards against hash collisions.
        return [qm.FieldCondition(key="user_id", match=qm.MatchValue(value=user_id))]

    def prepare(self, client: QdrantClient, collection: str) -> None:
        return None

    def delete_user(self, client: QdrantClient, user_id: str) -> None:
        name = self.collection(user_id)
        if client.collection_exists(name):
            client.delete_collection(name)

    def owned_collections(self, client: QdrantClient) -> list[str]:
        return [c.name for c in client.get_collections().collections if c.name.startswith(f"{self.prefix}__u_")]


class SharedCollection:
    """One collection for all users with a tenant-indexed ``user_id`` (best on a Qdrant server)."""

    name = "shared"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def collection(self, user_id: str) -> str:
        return f"{self.prefix}__shared"

    def user_conditions(self, user_id: str) -> list[qm.Condition]:
        return [qm.FieldCondition(key="user_id", match=qm.MatchValue(value=user_id))]

    def prepare(self, client: QdrantClient, collection: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")  # local mode: no-op
            client.create_payload_index(
                collection, "user_id",
                field_schema=qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True),
            )
            client.create_payload_index(collection, "ts", field_schema=qm.PayloadSchemaType.FLOAT)

    def delete_user(self, client: QdrantClient, user_id: str) -> None:
        name = self.collection(user_id)
        if client.collection_exists(name):
            client.delete(name, points_selector=qm.FilterSelector(filter=qm.Filter(must=self.user_conditions(user_id))))

    def owned_collections(self, client: QdrantClient) -> list[str]:
        name = f"{self.prefix}__shared"
        return [name] if client.collection_exists(name) else []


@dataclass
class _Store:
    """What every memory on one Qdrant client shares, so that none of them can hold a stale view.

    ``mirror``: the in-process search index (local clients only). ``existing``: collections known to
    exist; ``checked``: (collection, embedding) pairs created or checked compatible.
    """

    client: QdrantClient
    mirror: LocalIndexCache | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    existing: set[str] = field(default_factory=set)
    checked: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def local(cls, client: QdrantClient) -> _Store:
        return cls(client, LocalIndexCache(client))

    def exists(self, collection: str) -> bool:
        if collection in self.existing:
            return True
        if self.client.collection_exists(collection):
            with self.lock:
                self.existing.add(collection)
            return True
        return False

    def forget(self, collection: str) -> None:
        with self.lock:
            self.existing.discard(collection)
            self.checked = {pair for pair in self.checked if pair[0] != collection}
        if self.mirror is not None:
            self.mirror.invalidate(collection)


class _LocalClients:
    """Qdrant local mode allows one client per storage folder; memories on one folder share it (and its _Store)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, tuple[_Store, int]] = {}

    def acquire(self, path: Path) -> _Store:
        key = str(path.resolve())
        with self._lock:
            if key in self._stores:
                store, refs = self._stores[key]
                self._stores[key] = (store, refs + 1)
                return store
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=key)
            except RuntimeError as exc:
                raise MemoryStoreError(
                    f"memory folder {key} is in use by another process ({exc}). Qdrant's local mode allows one "
                    f"process per folder: stop the other process, use another --memory folder, or run a Qdrant "
                    f"server and pass its URL."
                ) from exc
            store = _Store.local(client)
            self._stores[key] = (store, 1)
            return store

    def release(self, path: Path) -> None:
        key = str(path.resolve())
        with self._lock:
            if key not in self._stores:
                return
            store, refs = self._stores[key]
            if refs <= 1:
                del self._stores[key]
                store.client.close()
            else:
                self._stores[key] = (store, refs - 1)

    def close_all(self) -> None:
        """Close every client still open (a memory never closed): at interpreter exit qdrant's own ``__del__``
        would close it after imports stopped working and print an ImportError traceback."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store, _ in stores:
            try:
                store.client.close()
            except Exception as exc:  # exiting anyway: a failed close must not hide the program's own outcome
                logger.debug("closing a memory client at exit failed: %s", exc)


_LOCAL_CLIENTS = _LocalClients()
atexit.register(_LOCAL_CLIENTS.close_all)


class EpisodicMemory:
    """Per-user episodic memory.

    ``location``: a folder (local mode, the default folder is ``default_memory_path()``) or
    ``":memory:"``. ``url``: a Qdrant server instead. ``layout``: "auto" (per-user collections
    locally, a shared tenant collection on a server), "per_user" or "shared". ``local_index``:
    in local mode with per-user collections, answer searches from an in-process numpy mirror
    of the user's collection (see ``persona_dspy.memory.local_index``); results are Qdrant's own.
    ``rrf_k``: the reciprocal-rank-fusion constant for hybrid search (60, the literature's value:
    on the LaMP dev sets Qdrant's default of 2 made hybrid no better than dense alone).
    """

    def __init__(
        self,
        location: str | Path | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        embedder: Embedder | None = None,
        embedding: EmbeddingConfig | None = None,
        layout: Literal["auto", "per_user", "shared"] = "auto",
        prefix: str = "persona_dspy",
        batch_size: int = 256,
        local_index: bool = True,
        rrf_k: int = RRF_K,
    ) -> None:
        if location is not None and url is not None:
            raise ValueError("give either a local location or a server url, not both")
        if embedder is not None and embedding is not None and embedder.config != embedding:
            raise ValueError("embedder and embedding disagree; pass one of them")
        self.embedder = embedder or Embedder(embedding)
        self.prefix = prefix
        self.batch_size = batch_size
        self.rrf_k = rrf_k
        self._local_path: Path | None = None
        if url is not None:
            self.location = url
            self._store = _Store(QdrantClient(url=url, api_key=api_key), mirror=None)
        elif str(location) == ":memory:":
            self.location = ":memory:"
            self._store = _Store.local(QdrantClient(location=":memory:"))
        else:
            self._local_path = Path(location).expanduser() if location is not None else default_memory_path()
            self.location = str(self._local_path)
            self._store = _LOCAL_CLIENTS.acquire(self._local_path)
        self.client = self._store.client
        if layout == "auto":
            layout = "shared" if url is not None else "per_user"
        if layout not in ("per_user", "shared"):
            raise ValueError(f"unknown layout {layout!r}; use auto, per_user or shared")
        self.layout: CollectionLayout = PerUserCollections(prefix) if layout == "per_user" else SharedCollection(prefix)
        # Writes keep a shared mirror current even when this memory does not search through it.
        self._mirror = self._store.mirror if self.layout.name == "per_user" else None
        self._search_mirror = self._mirror if local_index else None

    @classmethod
    def for_task(cls, task: str, location: str | Path | None = None, **options: object) -> EpisodicMemory:
        """The memory the CLI builds for a task (its own namespace: one user id in two datasets never mixes)."""
        return cls(location, prefix=task_namespace(task), **options)

    # -- lifecycle -------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> EpisodicMemory:
        """A store is a shared resource, not program state: copies of a program share it."""
        return self

    def close(self) -> None:
        if self._local_path is not None:
            _LOCAL_CLIENTS.release(self._local_path)
            self._local_path = None
        elif self.location != ":memory:":
            self.client.close()

    def __enter__(self) -> EpisodicMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------
    def add(self, user_id: str, items: Iterable[HistoryItem]) -> int:
        """Store a user's items, idempotent by item id. Returns how many were written.

        An item already stored with the same content is skipped (not re-embedded); one with new
        content replaces the stored one.

        The whole batch is validated and embedded before anything is written, so bad input never
        leaves a half-written batch behind.
        """
        _check_user(user_id)
        items = list(items)
        seen: dict[str, HistoryItem] = {}
        for item in items:
            if not isinstance(item, HistoryItem):
                raise TypeError(f"memory.add for user {user_id!r}: expected HistoryItem, got {type(item).__name__}")
            if not item.id or not str(item.id).strip():
                raise ValueError(f"memory.add for user {user_id!r}: an item has an empty id")
            if not item.text.strip():
                raise ValueError(f"memory.add for user {user_id!r}: item {item.id!r} has no text to remember")
            if item.id in seen and seen[item.id] != item:
                raise ValueError(
                    f"memory.add for user {user_id!r}: item id {item.id!r} appears twice with different content"
                )
            seen[item.id] = item
        unique = list(seen.values())
        if not unique:
            return 0
        collection, created = self._ensure_collection(self.layout.collection(user_id))
        written_count = 0
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start:start + self.batch_size]
            batch = [(point_id(user_id, it.id), _payload(user_id, it), it) for it in chunk]
            lock = self._mirror.collection_lock(collection) if self._mirror is not None else nullcontext()
            with lock:  # the Qdrant write and the mirror update happen in the same order for every writer
                if not created:  # re-ingesting a dataset must not re-embed what is already stored as is
                    stored = {str(p.id): p.payload for p in self.client.retrieve(
                        collection, ids=[pid for pid, _, _ in batch], with_payload=True, with_vectors=False)}
                    batch = [entry for entry in batch if stored.get(entry[0]) != entry[1]]
                if not batch:
                    continue
                vectors = self.embedder.embed_documents([it.text for _, _, it in batch])
                written = [(pid, payload, vec) for (pid, payload, _), vec in zip(batch, vectors, strict=True)]
                self.client.upsert(collection, points=[qm.PointStruct(id=pid, vector=_to_qdrant(vec), payload=payload)
                                                       for pid, payload, vec in written], wait=True)
                if self._mirror is not None:
                    self._mirror.apply_writes(collection, written)
            written_count += len(written)
        return written_count

    def add_histories(self, histories: Iterable[UserHistory]) -> int:
        """Store every user's history items (the union of their profiles; queries choose scopes at search time)."""
        return sum(self.add(h.user_id, h.items) for h in histories)

    def delete_user(self, user_id: str) -> None:
        """Forget everything about a user."""
        _check_user(user_id)
        collection = self.layout.collection(user_id)
        lock = self._mirror.collection_lock(collection) if self._mirror is not None else nullcontext()
        with lock:
            self.layout.delete_user(self.client, user_id)
            if self.layout.name == "per_user":
                self._store.forget(collection)

    # -- reading ---------------------------------------------------------------------------------
    def count(self, user_id: str | None = None) -> int:
        """Items stored for a user, or for everyone."""
        if user_id is not None:
            _check_user(user_id)
            name = self.layout.collection(user_id)
            if not self.client.collection_exists(name):
                return 0
            flt = qm.Filter(must=self.layout.user_conditions(user_id))
            return self.client.count(name, count_filter=flt, exact=True).count
        return sum(self.client.count(name, exact=True).count for name in self.layout.owned_collections(self.client))

    def users(self) -> list[str]:
        """The users that have anything stored."""
        found: set[str] = set()
        for name in self.layout.owned_collections(self.client):
            offset = None
            while True:
                points, offset = self.client.scroll(name, limit=1024, offset=offset, with_payload=["user_id"],
                                                    with_vectors=False)
                found.update(p.payload["user_id"] for p in points if p.payload)
                if offset is None:
                    break
        return sorted(found)

    def search(
        self,
        user_id: str,
        query: str,
        k: int = 5,
        before: datetime | None = None,
        *,
        exclude_ids: Sequence[str] = (),
        within_ids: Iterable[str] | None = None,
        mode: SearchMode = "auto",
    ) -> list[Passage]:
        """The ``k`` items of ``user_id`` most relevant to ``query``.

        ``before``: only items dated strictly earlier (undated items are then left out, since they
        cannot be shown to be earlier). ``exclude_ids``: never returned (the item being answered).
        ``within_ids``: only these items (a query's own profile). ``mode``: "auto" uses every
        vector the memory has, fused by reciprocal rank when there are two.
        """
        _check_user(user_id)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("search needs a non-empty query text")
        name = self.layout.collection(user_id)
        if not self._store.exists(name):
            return []
        within = None if within_ids is None else [point_id(user_id, i) for i in within_ids]
        if within is not None and not within:
            return []
        excluded = [point_id(user_id, i) for i in exclude_ids]
        before_ts = _timestamp(before) if before is not None else None
        vectors = self._query_vectors(query, mode)
        depth = max(4 * k, 40)  # candidates each vector contributes to the fusion
        if self._search_mirror is not None:
            index = self._search_mirror.get(name, lambda: qm.Filter(must=self.layout.user_conditions(user_id)))
            found = index.search(vectors, SearchFilter(before_ts, None if within is None else set(within), excluded),
                                 k, depth, self.rrf_k)
            return [_passage_from(payload, score) for payload, score in found]
        must: list[qm.Condition] = list(self.layout.user_conditions(user_id))
        if before_ts is not None:
            must.append(qm.FieldCondition(key="ts", range=qm.Range(lt=before_ts)))
        if within is not None:
            must.append(qm.HasIdCondition(has_id=within))
        must_not: list[qm.Condition] = [qm.HasIdCondition(has_id=excluded)] if excluded else []
        flt = qm.Filter(must=must, must_not=must_not or None)
        qdrant_vectors = {using: _to_qdrant_vector(vec) for using, vec in vectors.items()}
        if len(qdrant_vectors) == 1:
            (using, vector), = qdrant_vectors.items()
            response = self.client.query_points(name, query=vector, using=using, query_filter=flt, limit=k,
                                                with_payload=True)
        else:
            prefetch = [qm.Prefetch(query=vec, using=using, filter=flt, limit=depth)
                        for using, vec in qdrant_vectors.items()]
            response = self.client.query_points(name, prefetch=prefetch, query=qm.RrfQuery(rrf=qm.Rrf(k=self.rrf_k)),
                                                query_filter=flt, limit=k, with_payload=True)
        return [_passage(p) for p in response.points]

    def items(self, user_id: str) -> list[Passage]:
        """Everything stored for a user, oldest first (for summaries and inspection)."""
        _check_user(user_id)
        name = self.layout.collection(user_id)
        if not self.client.collection_exists(name):
            return []
        out: list[tuple[int, Passage]] = []
        offset = None
        while True:
            only_user = qm.Filter(must=self.layout.user_conditions(user_id))
            points, offset = self.client.scroll(name, scroll_filter=only_user, limit=1024, offset=offset,
                                                with_payload=True, with_vectors=False)
            out.extend((p.payload.get("position", 0), _passage(p)) for p in points)
            if offset is None:
                break
        return [p for _, p in sorted(out, key=lambda pair: pair[0])]

    # -- internals -------------------------------------------------------------------------------
    def _query_vectors(self, query: str, mode: SearchMode) -> dict[str, object]:
        wanted = {
            "auto": self.embedder.vector_names,
            "sparse": [SPARSE_VECTOR],
            "dense": [DENSE_VECTOR],
            "hybrid": [SPARSE_VECTOR, DENSE_VECTOR],
        }.get(mode)
        if wanted is None:
            raise ValueError(f"unknown search mode {mode!r}; use auto, sparse, dense or hybrid")
        missing = [v for v in wanted if v not in self.embedder.vector_names]
        if missing:
            raise ValueError(f"search mode {mode!r} needs {', '.join(missing)} vectors, which this memory is not "
                             f"configured with ({self.embedder.config.label})")
        return self.embedder.embed_query(query, wanted)

    def _ensure_collection(self, name: str) -> tuple[str, bool]:
        """The collection, created if absent (and whether it was created now); checked against this embedder."""
        key = (name, self.embedder.config.label)
        if key in self._store.checked:
            return name, False
        with self._store.lock:
            if key in self._store.checked:
                return name, False
            created = not self.client.collection_exists(name)
            if not created:
                self._check_compatible(name)
            else:
                dense = ({DENSE_VECTOR: qm.VectorParams(size=self.embedder.dense_size, distance=qm.Distance.COSINE)}
                         if self.embedder.has_dense else {})
                sparse = ({SPARSE_VECTOR: qm.SparseVectorParams(modifier=qm.Modifier.IDF)}
                          if self.embedder.has_sparse else None)
                self.client.create_collection(name, vectors_config=dense, sparse_vectors_config=sparse)
                self.layout.prepare(self.client, name)
                if self._mirror is not None:
                    self._mirror.start_empty(name, self.embedder.dense_size)
            self._store.existing.add(name)
            self._store.checked.add(key)
            return name, created

    def _check_compatible(self, name: str) -> None:
        """Refuse to mix vector configurations in one collection (the stored items would be unsearchable)."""
        params = self.client.get_collection(name).config.params
        dense_cfg = params.vectors if isinstance(params.vectors, dict) else {}
        has_dense = DENSE_VECTOR in dense_cfg
        has_sparse = bool(params.sparse_vectors) and SPARSE_VECTOR in params.sparse_vectors
        problems = []
        if has_sparse != self.embedder.has_sparse:
            problems.append(f"BM25 vectors: stored {has_sparse}, configured {self.embedder.has_sparse}")
        if has_dense != self.embedder.has_dense:
            problems.append(f"dense vectors: stored {has_dense}, configured {self.embedder.has_dense}")
        elif has_dense and dense_cfg[DENSE_VECTOR].size != self.embedder.dense_size:
            problems.append(f"dense size: stored {dense_cfg[DENSE_VECTOR].size}, configured {self.embedder.dense_size}")
        if problems:
            raise MemoryStoreError(
                f"collection {name} at {self.location} was built with another embedding configuration "
                f"({'; '.join(problems)}). Use the same --dense setting as when it was built, or another memory "
                f"folder; nothing was changed."
            )


def _check_user(user_id: str) -> None:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError(f"user id must be a non-empty string, got {user_id!r}")


def _to_qdrant_vector(vector: object) -> object:
    if isinstance(vector, SparseVectorData):
        return qm.SparseVector(indices=vector.indices, values=vector.values)
    return vector


def _to_qdrant(vectors: dict[str, object]) -> dict[str, object]:
    return {name: _to_qdrant_vector(vec) for name, vec in vectors.items()}


def _payload(user_id: str, item: HistoryItem) -> dict[str, object]:
    return {
        "user_id": user_id,
        "item_id": item.id,
        "text": item.text,
        "label": item.label,
        "fields": item.fields,
        "date": item.date.isoformat() if item.date is not None else None,
        "ts": _timestamp(item.date) if item.date is not None else None,
        "position": item.position,
    }


def _passage(point: qm.ScoredPoint | qm.Record) -> Passage:
    return _passage_from(point.payload or {}, float(getattr(point, "score", 0.0) or 0.0))


def _passage_from(payload: dict, score: float) -> Passage:
    return Passage(
        item_id=str(payload.get("item_id")),
        text=str(payload.get("text", "")),
        label=payload.get("label"),
        date=payload.get("date"),
        fields=dict(payload.get("fields") or {}),
        score=score,
    )
