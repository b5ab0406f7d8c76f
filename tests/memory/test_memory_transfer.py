"""Moving memories between stores: Edge to Edge (no Qdrant server runs here), resuming, and the old layout."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from persona_dspy.cli import main
from persona_dspy.data.records import HistoryItem
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.edge import OPEN_STORES
from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError, _payload, close_store, point_id
from persona_dspy.memory.transfer import copy_memories, open_any

SPEC = get_task("LaMP_3")
NAMESPACE = "pd_lamp_3"
WORDS = ["guitar", "amp", "drum", "sticks", "piano", "keys", "violin", "bow", "loud", "warm", "cheap", "broken"]


def history(user: int, n: int) -> list[HistoryItem]:
    return [HistoryItem.from_fields(SPEC, f"i{j}", datetime(2020, 1, 1) + timedelta(days=j),
                                    {"text": f"{WORDS[(user + j) % 12]} {WORDS[(user * j) % 12]} note {j}",
                                     "score": str(1 + j % 5)}, j) for j in range(n)]


def fill(folder, embedder, users: int = 3, per_user: int = 40) -> None:
    with EpisodicMemory.for_task("LaMP_3", folder, embedder=embedder) as mem:
        for u in range(users):
            mem.add(f"user{u}", history(u, per_user + u))


def searches(folder, embedder) -> list[list[tuple[str, float]]]:
    with EpisodicMemory.for_task("LaMP_3", folder, embedder=embedder) as mem:
        return [[(h.item_id, round(h.score, 5)) for h in mem.search(f"user{u}", f"{WORDS[u]} {WORDS[u + 3]}", k=5)]
                for u in range(3)]


def test_copy_between_edge_folders_is_checked_and_idempotent(tmp_path, bm25_embedder, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    fill(src, bm25_embedder)
    assert main(["memory", "copy", "--from", str(src), "--to", str(dst), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "3 users, 123 points written, 0 already there; counts match (123 in" in out
    assert searches(dst, bm25_embedder) == searches(src, bm25_embedder)
    assert main(["memory", "copy", "--from", str(src), "--to", str(dst)]) == 0
    assert "0 points written, 123 already there" in capsys.readouterr().out
    with EpisodicMemory.for_task("LaMP_3", dst, embedder=bm25_embedder) as mem:
        assert mem.users() == ["user0", "user1", "user2"] and mem.count("user2") == 42
        assert [p.item_id for p in mem.items("user1")] == [f"i{j}" for j in range(41)]


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_copy_resumes_where_it_stopped(tmp_path, bm25_embedder):
    src, dst = tmp_path / "src", tmp_path / "dst"
    fill(src, bm25_embedder)
    source, target = open_any(str(src)), open_any(str(dst), target=True)
    try:
        upsert, calls = target.upsert, []

        def failing(namespace, user, points):
            calls.append(len(points))
            if len(calls) == 4:
                raise Interrupted("the network went away")
            upsert(namespace, user, points)

        target.upsert = failing
        with pytest.raises(Interrupted):
            copy_memories(source, target, batch=16)
        del target.upsert
        report = copy_memories(source, target, batch=16)
        assert report.unchanged == 40 and report.written == 83  # user0 (3 batches) had been copied
        assert target.count(NAMESPACE) == 123
        with EpisodicMemory(store=target, prefix=NAMESPACE, embedder=bm25_embedder) as mem:
            mem.add("user0", [HistoryItem.from_fields(SPEC, "extra", None, {"text": "only here", "score": "1"}, 99)])
        with pytest.raises(MemoryStoreError, match="counts differ.*user0 \\(41 in the target, 40 in the source\\)"):
            copy_memories(source, target)
    finally:
        close_store(source)
        close_store(target)


def write_old_local_mode_store(folder, embedder, users: int = 3, per_user: int = 40) -> None:
    """A store as the previous version wrote it: qdrant-client local mode, one collection per user."""
    client = QdrantClient(path=str(folder))
    for u in range(users):
        user = f"user{u}"
        name = f"{NAMESPACE}__u_{hashlib.sha256(user.encode()).hexdigest()[:24]}"
        client.create_collection(name, vectors_config={},
                                 sparse_vectors_config={"bm25": qm.SparseVectorParams(modifier=qm.Modifier.IDF)})
        items = history(u, per_user + u)
        vectors = embedder.embed_documents([it.text for it in items])
        client.upsert(name, points=[qm.PointStruct(id=point_id(user, it.id), payload=_payload(user, it), vector={
            "bm25": qm.SparseVector(indices=v["bm25"].indices, values=v["bm25"].values)})
            for it, v in zip(items, vectors, strict=True)])
    client.close()


def test_an_old_local_mode_store_migrates_in_place(tmp_path, bm25_embedder, capsys):
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    write_old_local_mode_store(old, bm25_embedder)
    fill(fresh, bm25_embedder)
    with pytest.raises(MemoryStoreError, match=f"{old} holds a store in qdrant-client's local-mode layout"):
        EpisodicMemory.for_task("LaMP_3", old, embedder=bm25_embedder)
    assert main(["memory", "copy", "--from", str(old), "--to", str(old)]) == 0
    out = capsys.readouterr().out
    assert "3 users, 123 points written" in out and "local-mode-backup" in out
    assert (old / "local-mode-backup" / "collection").is_dir() and not (old / "collection").exists()
    assert searches(old, bm25_embedder) == searches(fresh, bm25_embedder)  # same vectors, same engine
    assert not {str(old.resolve()), str(fresh.resolve())} & set(OPEN_STORES._stores)  # all released


def test_copy_refuses_the_same_edge_store_and_a_missing_namespace(tmp_path, bm25_embedder, capsys):
    src = tmp_path / "src"
    fill(src, bm25_embedder, users=1, per_user=3)
    assert main(["memory", "copy", "--from", str(src), "--to", str(src)]) == 2
    assert "same store" in capsys.readouterr().err
    assert main(["memory", "copy", "--from", str(src), "--to", str(tmp_path / "d"), "--namespace", "pd_x"]) == 2
    assert "no memories named pd_x" in capsys.readouterr().err


def test_copy_from_edge_to_the_server_code_path_and_back(tmp_path, bm25_embedder):
    """The server store over qdrant-client's local mode (no Qdrant server runs here) as target, then as source."""
    import warnings

    from persona_dspy.memory.server import ServerStore

    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
    src, back = tmp_path / "src", tmp_path / "back"
    fill(src, bm25_embedder)
    server = ServerStore(QdrantClient(location=":memory:"), "server stand-in")
    source, returned = open_any(str(src)), open_any(str(back), target=True)
    try:
        assert copy_memories(source, server, batch=32).written == 123
        assert server.users(NAMESPACE) == ["user0", "user1", "user2"] and server.count(NAMESPACE) == 123
        assert copy_memories(source, server).unchanged == 123
        assert copy_memories(server, returned, batch=32).written == 123
    finally:
        close_store(source)
        close_store(returned)
        server.close()
    assert searches(back, bm25_embedder) == searches(src, bm25_embedder)
