"""The embedded memory store: Qdrant Edge (``qdrant-edge-py``), Qdrant's own engine in-process, on disk.

One Edge shard per user, opened on first use and kept in a bounded LRU, so opening a store costs nothing, an app
that loads one user pays for that user only, and BM25 statistics are per user (``benchmarks/edge_layout.py``
compares this with one shared shard). Search is exact, dense vectors are memory-mapped, the WAL is on (it survives
kill -9 and locks a user's shard to one process). A folder is opened by one process, or by several in shared mode
(``compile --ray``), each opening only its own users. Shards are sparse files: large apparent size, little used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdrant_edge import (
    CountRequest,
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeSparseVectorParams,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    Fusion,
    HasIdCondition,
    Modifier,
    PayloadSchemaType,
    Point,
    Prefetch,
    Query,
    QueryRequest,
    RangeFloat,
    ScrollRequest,
    SearchParams,
    SparseVector,
    UpdateOperation,
)

from persona_dspy.memory.embeddings import DENSE_VECTOR, SPARSE_VECTOR, SparseVectorData
from persona_dspy.memory.store import Hit, MemoryStoreError, SearchFilter, StoredPoint, VectorSpec

logger = logging.getLogger(__name__)

EDGE_DIR = "edge"
SPEC_FILE = "spec.json"
USER_FILE = "user_id"
LOCK_FILE = ".lock"
LEGACY_BACKUP = "local-mode-backup"
MAX_OPEN_SHARDS = 16


def legacy_local_layout(folder: Path) -> bool:
    """True when ``folder`` holds a store written by qdrant-client's local mode (before Qdrant Edge)."""
    return (folder / "meta.json").is_file() and (folder / "collection").is_dir()


@functools.lru_cache(maxsize=1 << 14)
def user_dir_name(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:24]


@functools.lru_cache(maxsize=1 << 16)
def _uuid(point_id: str) -> uuid.UUID:
    """Parsed once: Edge converts id strings on every filter (0.1 ms for a 47-item profile), UUIDs faster."""
    return uuid.UUID(point_id)


def _edge_vectors(vectors: dict[str, object]) -> dict[str, object]:
    return {name: SparseVector(vec.indices, vec.values) if isinstance(vec, SparseVectorData) else vec
                   for name, vec in vectors.items()}


def _from_edge_vectors(vectors: dict | None) -> dict[str, SparseVectorData | list[float]]:
    out: dict[str, SparseVectorData | list[float]] = {}
    for name, vec in (vectors or {}).items():
        out[name] = SparseVectorData(list(vec.indices), list(vec.values)) if isinstance(vec, SparseVector) \
            else list(vec)
    return out


def _translate(exc: Exception, path: Path) -> Exception:
    """Edge raises plain Exceptions; the WAL lock one becomes an error that says what to do."""
    text = str(exc)
    if "WouldBlock" in text or "Can't init WAL" in text:
        return MemoryStoreError(
            f"memory folder {path} is in use by another process (Qdrant Edge locks a shard's write-ahead log). "
            f"Stop the other process, use another --memory folder, or run a Qdrant server and pass its URL.")
    return exc


class _FolderLock:
    """A lock on the store folder, so a second process is refused at open, not at some user.

    Exclusive by default; ``shared`` lets several processes in (each opening only its own users) but no exclusive one.
    """

    def __init__(self, folder: Path, shared: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self._file = open(self.path, "a+")  # noqa: SIM115 (held open for the store's lifetime)
        try:
            import fcntl
        except ImportError:  # Windows: each shard's WAL lock still refuses a second writer
            return
        try:
            fcntl.flock(self._file, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            if shared:
                raise MemoryStoreError(
                    f"memory folder {folder.parent} is in use by another process (pid {holder}) that opened it "
                    f"alone; workers can share it only once that process has stopped.") from exc
            raise MemoryStoreError(
                f"memory folder {folder.parent} is in use by another process ({holder}); Qdrant Edge allows "
                f"one process per folder (or several workers of one `compile --ray`, each with its own users). Stop "
                f"the other process, use another --memory folder, or run a Qdrant server and pass its URL.") from exc
        if shared:  # several holders: no single pid to record
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing releases the flock


def folder_in_use(folder: Path) -> bool:
    """True while a live process holds the store lock of ``folder`` (a kill -9 releases it)."""
    lock = folder / EDGE_DIR / LOCK_FILE
    if not lock.is_file():
        return False
    try:
        import fcntl
    except ImportError:  # Windows: cannot tell, so never treat a folder as abandoned
        return True
    with open(lock, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
    return False


class EdgeStore:
    """Per-user Edge shards under one folder; every memory on the folder in a process shares one (see ``open``)."""

    kind = "edge"

    def __init__(self, folder: Path, max_open: int = MAX_OPEN_SHARDS, allow_legacy: bool = False,
                 shared: bool = False) -> None:
        self.folder = folder
        self.shared = shared
        self.location = str(folder)
        self.root = folder / EDGE_DIR
        if legacy_local_layout(folder) and not allow_legacy:
            raise MemoryStoreError(
                f"memory folder {folder} holds a store in qdrant-client's local-mode layout (meta.json, "
                f"collection/), which this version no longer reads. Migrate it into Qdrant Edge with "
                f"`persona-dspy memory copy --from {folder} --to {folder}` (the old files are kept in "
                f"{LEGACY_BACKUP}/), "
                f"or use another --memory folder.")
        self._lock = _FolderLock(self.root, shared)
        self.max_open = max_open
        self._cond = threading.Condition()
        self._open: OrderedDict[Path, list] = OrderedDict()  # shard folder -> [shard, users in flight]
        self._specs: dict[str, VectorSpec] = {}
        self._paths: dict[tuple[str, str], Path] = {}
        self._deleting = 0

    # -- shards ----------------------------------------------------------------------------------
    def _user_path(self, namespace: str, user_id: str) -> Path:
        path = self._paths.get((namespace, user_id))
        if path is None:
            if len(self._paths) > 1 << 16:
                self._paths.clear()
            path = self._paths[(namespace, user_id)] = self.root / namespace / user_dir_name(user_id)
        return path

    @contextmanager
    def _shard(self, namespace: str, user_id: str, create: bool = False) -> Iterator[EdgeShard | None]:
        """The user's open shard (None when the user has none and ``create`` is False), held open while used."""
        path = self._user_path(namespace, user_id)
        with self._cond:
            entry = self._open.get(path)
            if entry is None:
                shard = self._open_shard(namespace, user_id, path, create)
                if shard is not None:
                    entry = self._open[path] = [shard, 0]
                    self._evict(keep=path)
            if entry is not None:
                self._open.move_to_end(path)
                entry[1] += 1
        if entry is None:
            yield None
            return
        try:
            yield entry[0]
        finally:
            with self._cond:
                entry[1] -= 1
                if self._deleting:
                    self._cond.notify_all()

    def _open_shard(self, namespace: str, user_id: str, path: Path, create: bool) -> EdgeShard | None:
        shard_dir, owner = path / "shard", path / USER_FILE
        try:
            if (shard_dir / "edge_config.json").is_file():
                if owner.read_text(encoding="utf-8") != user_id:  # the folder name is 96 bits of a hash
                    raise MemoryStoreError(f"{path} belongs to another user than {user_id!r} (hash collision)")
                return EdgeShard.load(str(shard_dir))
            if not create:
                return None
            spec = self.spec(namespace)
            if spec is None:
                raise MemoryStoreError(f"namespace {namespace} at {self.location} has no vector configuration")
            path.mkdir(parents=True, exist_ok=True)
            owner.write_text(user_id, encoding="utf-8")  # first: a shard on disk always names its user
            shard = EdgeShard.create(str(shard_dir), _config(spec))
        except MemoryStoreError:
            raise
        except Exception as exc:  # Edge raises plain Exceptions
            if self.shared and "WouldBlock" in str(exc):
                raise MemoryStoreError(
                    f"the memory of user {user_id!r} at {path} is open in another process: workers sharing a "
                    f"folder must each open only their own users") from exc
            raise _translate(exc, self.folder) from exc
        shard.update(UpdateOperation.create_field_index("ts", PayloadSchemaType.Float))
        return shard

    def _evict(self, keep: Path) -> None:
        """Close least recently used shards beyond ``max_open`` (each open shard holds a thread, an FD and maps)."""
        for path in list(self._open):
            if len(self._open) <= self.max_open:
                return
            shard, in_flight = self._open[path]
            if in_flight == 0 and path != keep:
                del self._open[path]
                shard.close()

    # -- the store interface ---------------------------------------------------------------------
    def spec(self, namespace: str) -> VectorSpec | None:
        if namespace in self._specs:
            return self._specs[namespace]
        file = self.root / namespace / SPEC_FILE
        if not file.is_file():
            return None
        spec = self._specs[namespace] = VectorSpec.from_json(file.read_text())
        return spec

    def ensure(self, namespace: str, spec: VectorSpec) -> None:
        with self._cond:
            if self.spec(namespace) is None:
                (self.root / namespace).mkdir(parents=True, exist_ok=True)
                tmp = self.root / namespace / f"{SPEC_FILE}.{os.getpid()}.tmp"  # workers may race to write it
                tmp.write_text(spec.to_json())
                tmp.replace(self.root / namespace / SPEC_FILE)
                self._specs[namespace] = spec

    def retrieve(self, namespace: str, user_id: str, ids: list[str]) -> dict[str, dict]:
        with self._shard(namespace, user_id) as shard:
            if shard is None:
                return {}
            return {str(r.id): r.payload for r in shard.retrieve(ids, True, False)}

    def upsert(self, namespace: str, user_id: str, points: list[StoredPoint]) -> None:
        with self._shard(namespace, user_id, create=True) as shard:
            shard.update(UpdateOperation.upsert_points(
                [Point(p.id, _edge_vectors(p.vectors), p.payload) for p in points]))

    def query(self, namespace: str, user_id: str, vectors: dict[str, object], flt: SearchFilter, limit: int,
              depth: int, rrf_k: int) -> list[Hit]:
        # The shard holds this user only (checked when it is opened): no user condition, which cost 0.05 ms.
        must: list = []
        if flt.before_ts is not None:
            must.append(FieldCondition(key="ts", range=RangeFloat(lt=flt.before_ts)))
        if flt.within is not None:
            must.append(HasIdCondition({_uuid(i) for i in flt.within}))
        excluded = [HasIdCondition({_uuid(i) for i in flt.exclude})] if flt.exclude else None
        edge_filter = Filter(must=must or None, must_not=excluded) if must or excluded else None
        queries = [(Query.Nearest(_edge_vectors({using: vec})[using], using=using),
                    SearchParams(exact=True) if using == DENSE_VECTOR else None) for using, vec in vectors.items()]
        if len(queries) == 1:
            (query, params), = queries
            request = QueryRequest(limit=limit, query=query, filter=edge_filter, params=params, with_payload=True)
        else:
            request = QueryRequest(limit=limit, query=Fusion.Rrf(k=rrf_k), with_payload=True, prefetches=[
                Prefetch(limit=depth, query=query, filter=edge_filter, params=params) for query, params in queries])
        with self._shard(namespace, user_id) as shard:
            if shard is None:
                return []
            # Ids stay UUIDs: they order as their strings do, and str() costs 3 us each.
            return [Hit(p.id, p.payload or {}, p.score) for p in shard.query(request)]

    def delete_user(self, namespace: str, user_id: str) -> None:
        """Close the user's shard once no search or write holds it, and remove its folder."""
        path = self._user_path(namespace, user_id)
        with self._cond:
            entry = self._open.get(path)
            if entry is not None:
                self._deleting += 1
                try:
                    self._cond.wait_for(lambda: entry[1] == 0)
                finally:
                    self._deleting -= 1
                del self._open[path]
                entry[0].close()
            if path.exists():
                shutil.rmtree(path)

    def count(self, namespace: str, user_id: str | None = None) -> int:
        users = [user_id] if user_id is not None else self.users(namespace)
        total = 0
        for user in users:
            with self._shard(namespace, user) as shard:
                total += 0 if shard is None else shard.count(CountRequest(exact=True))
        return total

    def users(self, namespace: str) -> list[str]:
        folder = self.root / namespace
        if not folder.is_dir():
            return []
        return sorted(file.read_text(encoding="utf-8") for file in folder.glob(f"*/{USER_FILE}"))

    def namespaces(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{SPEC_FILE}"))

    def scroll(self, namespace: str, user_id: str, batch: int, with_vectors: bool) -> Iterator[list[StoredPoint]]:
        offset = None
        while True:
            with self._shard(namespace, user_id) as shard:
                if shard is None:
                    return
                records, offset = shard.scroll(ScrollRequest(offset=offset, limit=batch, with_payload=True,
                                                             with_vector=with_vectors))
            yield [StoredPoint(str(r.id), r.payload or {}, _from_edge_vectors(r.vector) if with_vectors else {})
                   for r in records]
            if offset is None:
                return

    def close(self) -> None:
        with self._cond:
            for shard, _ in self._open.values():
                shard.close()
            self._open.clear()
        self._lock.release()


def _config(spec: VectorSpec) -> EdgeConfig:
    return EdgeConfig(
        sparse_vectors={SPARSE_VECTOR: EdgeSparseVectorParams(modifier=Modifier.Idf)} if spec.sparse else None,
        vectors={DENSE_VECTOR: EdgeVectorParams(size=spec.dense_size, distance=Distance.Cosine, on_disk=True)}
        if spec.dense_size else None,
        max_search_threads=1,
    )


class _OpenStores:
    """One ``EdgeStore`` per folder per process (Edge allows one opener); memories on a folder share it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a memory's finalizer may release during an acquire (garbage collection)
        self._stores: dict[str, tuple[EdgeStore, int]] = {}

    def acquire(self, folder: Path, allow_legacy: bool = False, shared: bool = False) -> EdgeStore:
        """The folder's store; ``allow_legacy`` creates Edge data beside an old local-mode store (migration).

        ``shared``: beside other processes that each open only their own users (an exclusive store already open
        in this process serves too); asking for exclusive use of a folder this process opened shared is refused.
        """
        key = str(folder.expanduser().resolve())
        with self._lock:
            store, refs = self._stores.get(key, (None, 0))
            if store is not None and store.shared and not shared:
                raise MemoryStoreError(f"memory folder {key} is open in shared mode in this process; it cannot be "
                                       "opened for exclusive use until that closes")
            if store is None:
                store = EdgeStore(Path(key), allow_legacy=allow_legacy, shared=shared)
            self._stores[key] = (store, refs + 1)
            return store

    def release(self, store: EdgeStore) -> None:
        with self._lock:
            found, refs = self._stores.get(store.location, (None, 0))
            if found is not store:
                return
            if refs <= 1:
                del self._stores[store.location]
                store.close()
            else:
                self._stores[store.location] = (store, refs - 1)


OPEN_STORES = _OpenStores()
