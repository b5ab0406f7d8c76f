"""Episodic memory: each user's past interactions, searched per user with Qdrant's own engine.

Where it lives (one interface, two stores, see ``persona_dspy.memory.store``):
- Qdrant Edge, embedded, on disk (the default: a folder under the data directory, persists across
  processes; ``":memory:"`` is a temporary folder removed on close, for tests), one shard per user
  (``persona_dspy.memory.edge``);
- a Qdrant server by URL at scale, one tenant-indexed collection per task (``persona_dspy.memory.server``).

The engine scores, filters and fuses; this module embeds, validates and keeps re-ingest cheap.

Isolation: every search names exactly one user, resolved to that user's shard or a mandatory
``user_id`` condition; there is no API that searches across users.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from persona_dspy.data.records import HistoryItem, UserHistory
from persona_dspy.memory.edge import OPEN_STORES, folder_in_use
from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR, Embedder, EmbeddingConfig
from persona_dspy.memory.store import (
    RRF_K,
    MemoryStore,
    MemoryStoreError,
    SearchFilter,
    StoredPoint,
    VectorSpec,
    search_ranked,
)

logger = logging.getLogger(__name__)

__all__ = ["EpisodicMemory", "MemoryStoreError", "Passage", "SearchMode", "default_memory_path", "point_id",
           "task_namespace"]

SearchMode = Literal["auto", "sparse", "dense", "hybrid"]
_POINT_NAMESPACE = uuid.UUID("7f1d3a52-52a4-4bd4-9f0e-6c1b3f5d2a10")


def task_namespace(task: str) -> str:
    """The namespace (store prefix) of a task's memories, e.g. ``pd_lamp_3``."""
    from persona_dspy.data.tasks import get_task

    return f"pd_{get_task(task).name.lower()}"


def default_memory_path() -> Path:
    """``$PERSONA_DSPY_HOME/memory`` (default ``~/.persona_dspy/memory``)."""
    from persona_dspy.files import home

    return home() / "memory"


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


def open_store(location: str | Path | None = None, url: str | None = None,
               api_key: str | None = None, shared: bool = False) -> MemoryStore:
    """The store at a folder (Qdrant Edge; shared by every memory on it in this process) or a server URL.

    ``shared``: an Edge folder other processes open at the same time, each only for its own users (see
    ``memory.edge``); a server needs no such care.
    """
    if location is not None and url is not None:
        raise ValueError("give either a local location or a server url, not both")
    if url is not None:
        from persona_dspy.memory.server import ServerStore  # qdrant-client: ~100 MB of RSS an Edge app never needs

        return ServerStore.connect(url, api_key)
    folder = Path(location).expanduser() if location is not None else default_memory_path()
    return OPEN_STORES.acquire(folder, shared=shared)


def close_store(store: MemoryStore) -> None:
    """Release a store from ``open_store`` (an Edge folder closes when its last memory lets go)."""
    if store.kind == "edge":
        OPEN_STORES.release(store)
    else:
        store.close()


class EpisodicMemory:
    """Per-user episodic memory.

    ``location``: a folder (Qdrant Edge; the default folder is ``default_memory_path()``) or
    ``":memory:"`` (a temporary folder, removed on close). ``url``: a Qdrant server instead.
    ``store``: an already open ``MemoryStore`` (it is not closed with the memory).
    ``shared``: open an Edge folder beside other processes that each use only their own users (``memory.edge``).
    ``prefix``: the namespace (one per task, see ``for_task``). ``rrf_k``: the reciprocal-rank-fusion
    constant for hybrid search (60, the literature's value: on the LaMP dev sets Qdrant's default of 2
    made hybrid no better than dense alone).
    """

    def __init__(
        self,
        location: str | Path | None = None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        store: MemoryStore | None = None,
        embedder: Embedder | None = None,
        embedding: EmbeddingConfig | None = None,
        prefix: str = "persona_dspy",
        batch_size: int = 256,
        rrf_k: int = RRF_K,
        shared: bool = False,
    ) -> None:
        if embedder is not None and embedding is not None and embedder.config != embedding:
            raise ValueError("embedder and embedding disagree; pass one of them")
        if store is not None and (location is not None or url is not None):
            raise ValueError("give a store, a local location or a server url, not several")
        self.embedder = embedder or Embedder(embedding)
        self.prefix = prefix
        self.batch_size = batch_size
        self.rrf_k = rrf_k
        temporary: Path | None = None
        if store is None and str(location) == ":memory:":
            temporary = location = _temporary_folder()
        self.store: MemoryStore = store if store is not None else open_store(location, url, api_key, shared)
        # Runs once: on close(), when the memory is garbage-collected, or at exit (a forgotten ":memory:" store
        # must not leave its folder behind).
        self._release = weakref.finalize(self, _release, self.store if store is None else None, temporary)
        self.location = ":memory:" if temporary is not None else self.store.location
        self.layout = "one Edge shard per user" if self.store.kind == "edge" else "one tenant-indexed collection"
        self._spec = VectorSpec(self.embedder.has_sparse, self.embedder.dense_size)
        self._checked = False

    @classmethod
    def for_task(cls, task: str, location: str | Path | None = None, **options: object) -> EpisodicMemory:
        """The memory the CLI builds for a task (its own namespace: one user id in two datasets never mixes)."""
        return cls(location, prefix=task_namespace(task), **options)

    # -- lifecycle -------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> EpisodicMemory:
        """A store is a shared resource, not program state: copies of a program share it."""
        return self

    def close(self) -> None:
        self._release()

    def __enter__(self) -> EpisodicMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------
    def add(self, user_id: str, items: Iterable[HistoryItem]) -> int:
        """Store a user's items, idempotent by item id. Returns how many were written.

        An item already stored with the same content is skipped (not re-embedded); one with new
        content replaces the stored one. The whole batch is validated before anything is written, so
        bad input never leaves a half-written batch behind; each written chunk is durable when ``add``
        moves on (Edge's write-ahead log), so a crash loses at most the chunk being written.
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
        self._ensure_namespace()
        written = 0
        for start in range(0, len(unique), self.batch_size):
            chunk = [(point_id(user_id, it.id), _payload(user_id, it), it)
                     for it in unique[start:start + self.batch_size]]
            # Re-ingesting a dataset must not re-embed what is already stored as is.
            stored = self.store.retrieve(self.prefix, user_id, [pid for pid, _, _ in chunk])
            chunk = [entry for entry in chunk if stored.get(entry[0]) != entry[1]]
            if not chunk:
                continue
            vectors = self.embedder.embed_documents([it.text for _, _, it in chunk])
            self.store.upsert(self.prefix, user_id, [StoredPoint(pid, payload, vec)
                                                     for (pid, payload, _), vec in zip(chunk, vectors, strict=True)])
            written += len(chunk)
        return written

    def add_histories(self, histories: Iterable[UserHistory]) -> int:
        """Store every user's history items (the union of their profiles; queries choose scopes at search time)."""
        return sum(self.add(h.user_id, h.items) for h in histories)

    def delete_user(self, user_id: str) -> None:
        """Forget everything about a user."""
        _check_user(user_id)
        self.store.delete_user(self.prefix, user_id)

    # -- reading ---------------------------------------------------------------------------------
    def count(self, user_id: str | None = None) -> int:
        """Items stored for a user, or for everyone."""
        if user_id is not None:
            _check_user(user_id)
        return self.store.count(self.prefix, user_id)

    def users(self) -> list[str]:
        """The users that have anything stored."""
        return self.store.users(self.prefix)

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
        """The ``k`` items of ``user_id`` most relevant to ``query``; equal scores in point-id order.

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
        vectors = self._query_vectors(query, mode)
        within = None if within_ids is None else frozenset(point_id(user_id, i) for i in within_ids)
        if within is not None and not within:
            return []
        flt = SearchFilter(_timestamp(before) if before is not None else None, within,
                           frozenset(point_id(user_id, i) for i in exclude_ids))
        depth = max(4 * k, 40)  # candidates each vector contributes to the fusion
        hits = search_ranked(self.store, self.prefix, user_id, vectors, flt, k, depth, self.rrf_k)
        return [_passage(hit.payload, hit.score) for hit in hits]

    def items(self, user_id: str) -> list[Passage]:
        """Everything stored for a user, oldest first (for summaries and inspection)."""
        _check_user(user_id)
        out = [p.payload for batch in self.store.scroll(self.prefix, user_id, 1024, with_vectors=False) for p in batch]
        return [_passage(payload, 0.0) for payload in sorted(out, key=lambda payload: payload.get("position", 0))]

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

    def _ensure_namespace(self) -> None:
        """Create the namespace with this embedder's vectors, or refuse to mix configurations in it."""
        if self._checked:
            return
        stored = self.store.spec(self.prefix)
        if stored is None:
            self.store.ensure(self.prefix, self._spec)
        elif stored != self._spec:
            raise MemoryStoreError(
                f"memories {self.prefix} at {self.location} were built with another embedding configuration "
                f"(stored {stored.describe()}, configured {self._spec.describe()}). Use the same --dense setting "
                f"as when they were built, or another memory folder; nothing was changed."
            )
        self._checked = True


def _temporary_folder(stale_after_s: float = 600.0) -> Path:
    """A new ``":memory:"`` folder; those of processes killed before they could clean up are removed first."""
    parent = Path(tempfile.gettempdir()) / "persona-dspy-memory"
    parent.mkdir(exist_ok=True)
    for folder in parent.iterdir():
        try:
            old = time.time() - folder.stat().st_mtime > stale_after_s  # a new folder may not be locked yet
        except FileNotFoundError:
            continue
        if old and not folder_in_use(folder):
            logger.info("removing the abandoned temporary memory %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=parent))


def _release(store: MemoryStore | None, temporary: Path | None) -> None:
    """Let go of an owned store, and remove a ``":memory:"`` folder."""
    if store is not None:
        close_store(store)
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_user(user_id: str) -> None:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError(f"user id must be a non-empty string, got {user_id!r}")


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


def _passage(payload: dict, score: float) -> Passage:
    return Passage(
        item_id=str(payload.get("item_id")),
        text=str(payload.get("text", "")),
        label=payload.get("label"),
        date=payload.get("date"),
        fields=dict(payload.get("fields") or {}),
        score=score,
    )
