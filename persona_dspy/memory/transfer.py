"""Moving memories between stores: an Edge folder, a Qdrant server, or a folder in the old local-mode layout.

``copy_memories`` copies points as stored (payloads and vectors, never re-embedded) through the
``MemoryStore`` interface, user by user in batches. It is idempotent and resumable: a point already
in the target with the same payload is not written again, so an interrupted copy re-run picks up where
it stopped at the cost of reading. At the end every user's count in the target is checked against the
source. A folder written by qdrant-client's local mode (``meta.json`` + ``collection/``; before Qdrant
Edge) is read with qdrant-client and can be migrated into Edge in the same folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qdrant_client import QdrantClient
from qdrant_client import models as qm

from persona_dspy.memory.edge import LEGACY_BACKUP, OPEN_STORES, legacy_local_layout
from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR
from persona_dspy.memory.episodic import open_store
from persona_dspy.memory.server import from_vectors
from persona_dspy.memory.store import Hit, MemoryStore, MemoryStoreError, SearchFilter, StoredPoint, VectorSpec

logger = logging.getLogger(__name__)


class LegacyLocalStore:
    """Read-only view of a store written by qdrant-client's local mode (per-user or shared collections)."""

    kind = "legacy-local"

    def __init__(self, folder: Path) -> None:
        self.location = str(folder)
        try:
            self.client = QdrantClient(path=str(folder))
        except RuntimeError as exc:
            raise MemoryStoreError(f"old local-mode store {folder} is in use by another process ({exc})") from exc
        self._collections = [c.name for c in self.client.get_collections().collections]

    def _collection(self, namespace: str, user_id: str) -> str | None:
        per_user = f"{namespace}__u_{hashlib.sha256(user_id.encode('utf-8')).hexdigest()[:24]}"
        for name in (per_user, f"{namespace}__shared"):
            if name in self._collections:
                return name
        return None

    def _namespace_collections(self, namespace: str) -> list[str]:
        return [c for c in self._collections if c == f"{namespace}__shared" or c.startswith(f"{namespace}__u_")]

    def namespaces(self) -> list[str]:
        found = {c.split("__u_")[0] if "__u_" in c else c.removesuffix("__shared") for c in self._collections
                 if "__u_" in c or c.endswith("__shared")}
        return sorted(found)

    def spec(self, namespace: str) -> VectorSpec | None:
        names = self._namespace_collections(namespace)
        if not names:
            return None
        params = self.client.get_collection(names[0]).config.params
        dense = params.vectors.get(DENSE_VECTOR) if isinstance(params.vectors, dict) else None
        return VectorSpec(bool(params.sparse_vectors) and SPARSE_VECTOR in params.sparse_vectors,
                          dense.size if dense is not None else None)

    def _scroll_all(self, name: str, flt: qm.Filter | None, batch: int, with_vectors: bool) -> Iterator[list]:
        offset = None
        while True:
            points, offset = self.client.scroll(name, scroll_filter=flt, limit=batch, offset=offset,
                                                with_payload=True, with_vectors=with_vectors)
            yield points
            if offset is None:
                return

    def users(self, namespace: str) -> list[str]:
        found: set[str] = set()
        for name in self._namespace_collections(namespace):
            for points in self._scroll_all(name, None, 1024, with_vectors=False):
                found.update(p.payload["user_id"] for p in points if p.payload)
        return sorted(found)

    def _user_filter(self, user_id: str) -> qm.Filter:
        return qm.Filter(must=[qm.FieldCondition(key="user_id", match=qm.MatchValue(value=user_id))])

    def count(self, namespace: str, user_id: str | None = None) -> int:
        if user_id is None:
            return sum(self.count(namespace, user) for user in self.users(namespace))
        name = self._collection(namespace, user_id)
        return 0 if name is None else self.client.count(name, count_filter=self._user_filter(user_id)).count

    def scroll(self, namespace: str, user_id: str, batch: int, with_vectors: bool) -> Iterator[list[StoredPoint]]:
        name = self._collection(namespace, user_id)
        if name is None:
            return
        for points in self._scroll_all(name, self._user_filter(user_id), batch, with_vectors):
            yield [StoredPoint(str(p.id), p.payload or {}, from_vectors(p.vector) if with_vectors else {})
                   for p in points]

    def _read_only(self, *_: object) -> None:
        raise MemoryStoreError(f"{self.location} is an old local-mode store: it can only be copied from")

    ensure = upsert = delete_user = _read_only

    def retrieve(self, namespace: str, user_id: str, ids: list[str]) -> dict[str, dict]:
        name = self._collection(namespace, user_id)
        return {} if name is None else {str(p.id): p.payload for p in self.client.retrieve(name, ids=ids)}

    def query(self, namespace: str, user_id: str, vectors: dict[str, object], flt: SearchFilter, limit: int,
              depth: int, rrf_k: int) -> list[Hit]:
        raise MemoryStoreError(f"{self.location} is an old local-mode store: copy it into Qdrant Edge to search it")

    def close(self) -> None:
        self.client.close()


def open_any(where: str, target: bool = False, api_key: str | None = None) -> MemoryStore:
    """A store by address: an http(s) URL (a Qdrant server), or a folder (Edge, or the old local-mode layout).

    As a ``target``, a folder is always Edge: Edge data goes beside an old local-mode store, which stays as it was.
    Release it with ``episodic.close_store``.
    """
    if where.startswith(("http://", "https://")):
        return open_store(url=where, api_key=api_key)
    folder = Path(where).expanduser()
    if not target and legacy_local_layout(folder):
        return LegacyLocalStore(folder)
    return OPEN_STORES.acquire(folder, allow_legacy=target)


@dataclass
class CopyReport:
    """What a copy did, per namespace: users seen, points written, points already there."""

    namespaces: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def written(self) -> int:
        return sum(n["written"] for n in self.namespaces.values())

    @property
    def unchanged(self) -> int:
        return sum(n["unchanged"] for n in self.namespaces.values())


def copy_memories(source: MemoryStore, target: MemoryStore, namespaces: list[str] | None = None,
                  batch: int = 256, progress: Callable[[str], None] | None = None) -> CopyReport:
    """Copy every user's points of ``namespaces`` (default: all) from ``source`` to ``target``; see the module."""
    report = CopyReport()
    for namespace in namespaces or source.namespaces():
        spec = source.spec(namespace)
        if spec is None:
            raise MemoryStoreError(f"{source.location} has no memories named {namespace}")
        existing = target.spec(namespace)
        if existing is not None and existing != spec:
            raise MemoryStoreError(f"{namespace} at {target.location} holds {existing.describe()} vectors, "
                                   f"{source.location} {spec.describe()}; copy into another folder")
        target.ensure(namespace, spec)
        stats = report.namespaces[namespace] = {"users": 0, "written": 0, "unchanged": 0}
        mismatched: list[str] = []
        for user in source.users(namespace):
            for points in source.scroll(namespace, user, batch, with_vectors=True):
                there = target.retrieve(namespace, user, [p.id for p in points])
                fresh = [p for p in points if there.get(p.id) != p.payload]
                if fresh:
                    target.upsert(namespace, user, fresh)
                stats["written"] += len(fresh)
                stats["unchanged"] += len(points) - len(fresh)
            stats["users"] += 1
            want, got = source.count(namespace, user), target.count(namespace, user)
            if want != got:
                mismatched.append(f"{user} ({got} in the target, {want} in the source)")
            if progress is not None:
                progress(f"{namespace}: {stats['users']} users, {stats['written']} points written, "
                         f"{stats['unchanged']} already there")
        if mismatched:
            raise MemoryStoreError(f"{namespace}: counts differ after the copy for {len(mismatched)} users, e.g. "
                                   f"{'; '.join(mismatched[:3])} (the target held other items already?)")
    return report


def retire_legacy_layout(folder: Path) -> Path:
    """After a verified in-place migration: move the old local-mode files aside, so the folder opens as Edge."""
    backup = folder / LEGACY_BACKUP
    backup.mkdir(exist_ok=True)
    for name in ("meta.json", "collection", ".lock"):
        if (folder / name).exists():
            (folder / name).replace(backup / name)
    logger.info("old local-mode files of %s moved to %s", folder, backup)
    return backup
