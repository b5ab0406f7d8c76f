"""Episodic memory: storage, time and scope filters, isolation between users, persistence, bad input."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import warnings
from datetime import datetime, timedelta

import pytest
from qdrant_client import QdrantClient

from persona_dspy.data.records import HistoryItem, Query, UserHistory
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig, EmbeddingModelError
from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError, point_id
from persona_dspy.memory.retrieval import MemoryRetrieval, memory_search_tool
from persona_dspy.memory.server import ServerStore

SPEC = get_task("LaMP_3")
TOPICS = ["guitar amp", "drum sticks", "piano keys", "violin bow", "microphone stand", "guitar strings",
          "tuner pedal", "audio cable", "bass guitar", "ukulele case"]


def item(item_id: str, text: str, score: int = 5, day: int | None = 1, position: int = 0) -> HistoryItem:
    date = datetime(2020, 1, 1) + timedelta(days=day) if day is not None else None
    return HistoryItem.from_fields(SPEC, item_id, date, {"text": text, "score": str(score)}, position)


def server_stand_in() -> ServerStore:
    """The server store over qdrant-client's local mode: the server code path without a server (none runs here).

    Local mode computes IDF over the whole collection and ignores payload indexes; per-user IDF is tested on Edge.
    """
    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
    warnings.filterwarnings("ignore", message="Local mode performs exact")
    return ServerStore(QdrantClient(location=":memory:"), "server stand-in")


def open_memory(backend: str, embedder) -> EpisodicMemory:
    if backend == "edge":
        return EpisodicMemory(":memory:", embedder=embedder)
    return EpisodicMemory(store=server_stand_in(), embedder=embedder)


@pytest.fixture(params=["edge", "server"])
def memory(request, bm25_embedder):
    with open_memory(request.param, bm25_embedder) as mem:
        yield mem
    if request.param == "server":
        mem.store.close()


def test_add_is_idempotent_and_counts(memory):
    items = [item(f"i{n}", f"review of a {TOPICS[n]}", day=n, position=n) for n in range(5)]
    assert memory.add("alice", items) == 5
    assert memory.add("alice", items[:3]) == 0  # stored as is: not embedded or written again
    assert memory.add("alice", [items[0], item("i1", "a changed review", day=1, position=1)]) == 1
    assert memory.count("alice") == 5
    assert memory.count("bob") == 0
    memory.add("bob", [item("i0", "another review")])
    assert memory.count() == 6
    assert memory.users() == ["alice", "bob"]
    memory.delete_user("alice")
    assert memory.count("alice") == 0
    assert memory.search("alice", "guitar") == []
    assert memory.count("bob") == 1


def test_readding_an_item_replaces_it(memory):
    memory.add("alice", [item("i0", "great guitar amp", score=5)])
    memory.add("alice", [item("i0", "great guitar amp", score=2)])
    [found] = memory.search("alice", "guitar amp")
    assert found.label == "2"
    assert memory.count("alice") == 1


def test_search_returns_fields_labels_and_relevance_order(memory):
    memory.add("alice", [item("a", "loud guitar amp with tubes", 5, day=1), item("b", "cheap drum sticks", 2, day=2),
                         item("c", "guitar amp hum problem", 3, day=3)])
    hits = memory.search("alice", "guitar amp", k=2)
    assert {h.item_id for h in hits} == {"a", "c"}
    assert hits[0].fields["score"] == hits[0].label
    assert hits[0].date.startswith("2020-01")
    assert hits[0].score >= hits[1].score
    assert "-> " in hits[0].render()


def test_before_is_strict_and_drops_undated_items(memory):
    memory.add("alice", [item("old", "guitar amp", day=1), item("same", "guitar amp tubes", day=5),
                         item("late", "guitar amp pedal", day=9), item("nodate", "guitar amp nodate", day=None)])
    cutoff = datetime(2020, 1, 1) + timedelta(days=5)
    ids = {h.item_id for h in memory.search("alice", "guitar amp", k=10, before=cutoff)}
    assert ids == {"old"}
    assert {h.item_id for h in memory.search("alice", "guitar amp", k=10)} == {"old", "same", "late", "nodate"}


def test_exclude_and_within(memory):
    memory.add("alice", [item(f"i{n}", f"guitar amp number {n}", day=n) for n in range(6)])
    hits = memory.search("alice", "guitar amp", k=10, exclude_ids=["i1"], within_ids=["i0", "i1", "i2"])
    ids = {h.item_id for h in hits}
    assert ids == {"i0", "i2"}
    assert memory.search("alice", "guitar amp", within_ids=[]) == []


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_isolation_many_users_random_queries(bm25_embedder, backend):
    """Users share item ids and vocabulary; no search may ever return another user's item."""
    rng = random.Random(1234)
    with open_memory(backend, bm25_embedder) as mem:
        owners: dict[str, set[str]] = {}
        for u in range(24):  # more than the 16 shards kept open
            user = f"user-{u}"
            texts = [f"{rng.choice(TOPICS)} {rng.choice(TOPICS)} owner{u}" for _ in range(rng.randint(3, 25))]
            mem.add(user, [item(f"i{n}", t, day=n, position=n) for n, t in enumerate(texts)])
            owners[user] = {t for t in texts}
        for _ in range(150):
            user = f"user-{rng.randrange(24)}"
            query = " ".join(rng.sample(TOPICS, 2)) + f" owner{rng.randrange(24)}"
            hits = mem.search(user, query, k=rng.randint(1, 10),
                              before=datetime(2020, 1, 1) + timedelta(days=rng.randint(1, 30)))
            assert all(h.text in owners[user] for h in hits), (user, query, [h.text for h in hits])
        assert mem.count() == sum(mem.count(u) for u in owners)
        mem.delete_user("user-3")
        assert mem.count("user-3") == 0 and mem.count("user-4") > 0


def test_bad_input_is_refused_and_nothing_stored_is_lost(memory):
    memory.add("alice", [item("i0", "guitar amp")])
    with pytest.raises(ValueError, match="empty id"):
        memory.add("alice", [item("ok", "drum"), item(" ", "bad")])
    with pytest.raises(ValueError, match="'dup' appears twice"):
        memory.add("alice", [item("dup", "drum"), item("dup", "piano")])
    with pytest.raises(ValueError, match="no text"):
        memory.add("alice", [item("blank", "   ")])
    with pytest.raises(TypeError, match="expected HistoryItem"):
        memory.add("alice", [{"id": "x"}])
    with pytest.raises(ValueError, match="user id"):
        memory.add("", [item("x", "y")])
    with pytest.raises(ValueError, match="non-empty query"):
        memory.search("alice", "  ")
    with pytest.raises(ValueError, match="k must be positive"):
        memory.search("alice", "guitar", k=0)
    with pytest.raises(ValueError, match="dense"):
        memory.search("alice", "guitar", mode="dense")
    assert memory.count("alice") == 1
    assert [h.item_id for h in memory.search("alice", "guitar")] == ["i0"]


def test_local_store_persists_across_processes_and_is_locked(tmp_path, bm25_embedder):
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        mem.add("alice", [item("i0", "guitar amp"), item("i1", "drum sticks")])
        # A second memory on the same folder in this process shares the client instead of failing.
        with EpisodicMemory(store, embedder=bm25_embedder) as again:
            assert again.count("alice") == 2
        probe = textwrap.dedent(f"""
            from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError
            try:
                EpisodicMemory({str(store)!r})
            except MemoryStoreError as exc:
                print("LOCKED", exc)
        """)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert "LOCKED" in out.stdout and "in use by another process" in out.stdout, out.stderr[-2000:]
        assert str(store) in out.stdout and "another --memory folder" in out.stdout
    reader = textwrap.dedent(f"""
        from persona_dspy.memory.episodic import EpisodicMemory
        with EpisodicMemory({str(store)!r}) as mem:
            print(mem.count("alice"), [h.item_id for h in mem.search("alice", "guitar")])
    """)
    out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "['i0']"], out.stderr[-2000:]


def test_missing_dense_model_gives_a_clear_error(tmp_path):
    with pytest.raises(EmbeddingModelError, match="not available.*local ONNX folder"):
        Embedder(EmbeddingConfig(dense="no-such-org/no-such-model"))
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(EmbeddingModelError, match="no model.onnx"):
        Embedder(EmbeddingConfig(dense=str(empty)))
    with pytest.raises(EmbeddingModelError, match="does not exist"):
        Embedder(EmbeddingConfig(dense=str(tmp_path / "absent")))
    with pytest.raises(ValueError, match="needs sparse"):
        EmbeddingConfig(sparse=False, dense=None)


@pytest.mark.parametrize("backend", ["edge", "server"])
def test_dense_and_hybrid_search(hybrid_embedder, backend):
    with open_memory(backend, hybrid_embedder) as mem:
        mem.add("alice", [item("amp", "This amplifier is loud and warm", 5, day=1),
                          item("sticks", "The drumsticks splintered after a week", 1, day=2),
                          item("keys", "Weighted piano keys feel realistic", 4, day=3)])
        # No word in common with the amp review: only the dense vectors can find it.
        assert mem.search("alice", "speaker volume for my electric guitar", k=1, mode="dense")[0].item_id == "amp"
        assert mem.search("alice", "speaker volume for my electric guitar", k=1, mode="sparse") == []
        dense_model = hybrid_embedder._dense
        calls = []
        original = dense_model.query_embed
        dense_model.query_embed = lambda text, **kw: calls.append(text) or original(text, **kw)
        try:
            mem.search("alice", "drumsticks", mode="sparse")
            assert calls == []  # a BM25 search never runs the dense model
            mem.search("alice", "drumsticks", mode="dense")
            assert calls == ["drumsticks"]
        finally:
            del dense_model.query_embed
        hybrid = mem.search("alice", "drumsticks broke", k=2, mode="hybrid")
        assert hybrid[0].item_id == "sticks"
        earlier = mem.search("alice", "drumsticks", k=3, before=datetime(2020, 1, 3))
        assert {h.item_id for h in earlier} == {"amp"}


def test_embedding_configuration_mismatch_is_refused(tmp_path, bm25_embedder, hybrid_embedder):
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        mem.add("alice", [item("i0", "guitar amp")])
    with EpisodicMemory(store, embedder=hybrid_embedder) as mem:
        with pytest.raises(MemoryStoreError, match="another embedding configuration"):
            mem.add("alice", [item("i1", "drum sticks")])
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        assert mem.count("alice") == 1


def _history() -> UserHistory:
    items = [item(f"i{n}", f"{TOPICS[n % 4]} review {n}", score=1 + n % 5, day=n, position=n) for n in range(8)]
    queries = [Query("q1", "review: guitar amp", "5", frozenset({"i0", "i1", "i2", "i3", "i4", "i5"}),
                     before=items[5].date + timedelta(days=1)),
               Query("q2", "review: drum sticks", "4", frozenset(it.id for it in items), None)]
    return UserHistory("alice", "LaMP_3", items, queries)


def test_scopes_keep_queries_and_interactions_from_leaking(memory):
    history = _history()
    memory.add(history.user_id, history.items)
    retrieve = MemoryRetrieval(memory, k=10)
    q1 = retrieve(query="guitar amp review", scope=MemoryScope.for_query("alice", history.queries[0]))
    assert {p.item_id for p in q1.passages} <= history.queries[0].profile_ids
    assert {"i6", "i7"}.isdisjoint(p.item_id for p in q1.passages)
    target = history.items[4]
    past = retrieve(query=target.text, scope=MemoryScope.for_interaction(history, target))
    assert past.passages and all(p.item_id in {"i0", "i1", "i2", "i3"} for p in past.passages)
    assert "1." in past.context


def test_memory_tool_is_bound_to_one_user(memory):
    memory.add("alice", [item("a", "guitar amp alice")])
    memory.add("bob", [item("b", "guitar amp bob")])
    tool = memory_search_tool(memory, MemoryScope("alice"))
    text = tool("guitar amp")
    assert "alice" in text and "bob" not in text
    assert "nothing relevant" in tool("saxophone")
    assert tool.__name__ == "search_user_history" and "past interactions" in tool.__doc__




def _random_items(rng: random.Random, words: list[str], n: int) -> list[HistoryItem]:
    # Distinct lengths keep BM25 scores from tying, so the two engines' orders can be compared id by id.
    return [item(f"i{n}", " ".join(rng.choices(words, k=3 + n)), score=1 + n % 5,
                 day=rng.choice([None, *range(60)]), position=n) for n in range(n)]


@pytest.mark.parametrize("mode", ["sparse", "dense", "hybrid"])
def test_edge_and_server_code_paths_agree(request, bm25_embedder, mode):
    """Both stores, same data and filters: same scores and order (one user, so collection-wide IDF is per user)."""
    embedder = bm25_embedder if mode == "sparse" else request.getfixturevalue("hybrid_embedder")
    rng = random.Random(99)
    words = " ".join(TOPICS).split() + ["warm", "loud", "cheap", "broken", "great", "tone", "price", "quality"]
    words += [f"{w}{j}" for w in ("model", "brand", "color", "size") for j in range(12)]
    items = _random_items(rng, words, 120)
    with open_memory("edge", embedder) as edge, open_memory("server", embedder) as server:
        edge.add("alice", items)
        server.add("alice", items)
        for _ in range(60):
            kwargs = {"k": rng.randint(1, 25)}
            if rng.random() < 0.5:
                kwargs["before"] = datetime(2020, 1, 1) + timedelta(days=rng.randint(0, 60))
            if rng.random() < 0.5:
                kwargs["within_ids"] = [f"i{n}" for n in rng.sample(range(120), 50)]
            if rng.random() < 0.5:
                kwargs["exclude_ids"] = [f"i{n}" for n in rng.sample(range(120), 12)]
            query = " ".join(rng.sample(words, rng.randint(1, 4)))
            got = edge.search("alice", query, mode=mode, **kwargs)
            want = server.search("alice", query, mode=mode, **kwargs)
            assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-4), (query, kwargs)
            if mode == "sparse":
                assert [h.item_id for h in got] == [h.item_id for h in want], (query, kwargs)
        assert edge.count("alice") == server.count("alice") == 120


def test_bm25_statistics_are_per_user(bm25_embedder):
    """Another user's items never change a user's scores (IDF counts only the user's own items)."""
    mine = [item(f"i{n}", f"guitar amp {TOPICS[n]}", day=n, position=n) for n in range(6)]
    with EpisodicMemory(":memory:", embedder=bm25_embedder) as mem:
        mem.add("alice", mine)
        before = [(h.item_id, h.score) for h in mem.search("alice", "guitar strings tuner", k=6)]
        mem.add("bob", [item(f"b{n}", f"guitar strings number {n}", day=n) for n in range(40)])
        after = [(h.item_id, h.score) for h in mem.search("alice", "guitar strings tuner", k=6)]
    assert before == after and len(before) == 6


def test_equal_scores_rank_by_point_id_whatever_k(tmp_path, bm25_embedder):
    same = [item(f"i{n}", "guitar amp", day=n, position=n) for n in range(12)]
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as written:
        written.add("alice", same[::-1])
        everything = [h.item_id for h in written.search("alice", "guitar", k=12)]
        for k in (1, 3, 5, 11):
            assert [h.item_id for h in written.search("alice", "guitar", k=k)] == everything[:k]
    with EpisodicMemory(store, embedder=bm25_embedder) as reopened:
        assert [h.item_id for h in reopened.search("alice", "guitar", k=12)] == everything
    assert everything == sorted(everything, key=lambda i: point_id("alice", i))


def test_memories_on_one_folder_share_one_store(tmp_path, bm25_embedder):
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as a, EpisodicMemory(store, embedder=bm25_embedder) as b:
        assert a.store is b.store
        a.add("u", [item("x", "guitar amp")])
        b.add("u", [item("y", "drum sticks")])
        assert [h.item_id for h in a.search("u", "drum")] == ["y"]
        b.delete_user("u")
        assert a.search("u", "guitar") == [] and a.count("u") == 0 and a.users() == []
        b.add("u", [item("z", "piano keys")])
        a.add("u", [item("w", "violin bow")])
        assert {h.item_id for h in a.search("u", "piano keys violin bow", k=5)} == {"z", "w"}


def test_open_shards_are_bounded_and_evicted_shards_reopen(tmp_path, bm25_embedder):
    with EpisodicMemory(tmp_path / "mem", embedder=bm25_embedder) as mem:
        mem.store.max_open = 2
        for u in range(6):
            mem.add(f"user{u}", [item("a", f"guitar amp owner{u}"), item("b", f"drum sticks owner{u}")])
        assert len(mem.store._open) <= 2
        for u in range(6):
            assert [h.text for h in mem.search(f"user{u}", "guitar")] == [f"guitar amp owner{u}"]
        assert mem.count() == 12 and mem.users() == [f"user{u}" for u in range(6)]
        assert len(mem.store._open) <= 2


@pytest.mark.slow  # a concurrency stress run: 13 s to 100 s on 2 cores, so not in the inner loop
def test_threads_search_while_one_writes(bm25_embedder):
    import threading

    with EpisodicMemory(":memory:", embedder=bm25_embedder) as mem:
        mem.add("alice", [item(f"s{n}", f"guitar amp seed {n}", day=n) for n in range(20)])
        errors: list[BaseException] = []
        done = threading.Event()
        seen_counts: list[list[int]] = [[] for _ in range(3)]  # one list per reader: each must only grow

        def write() -> None:
            try:
                for n in range(200):
                    mem.add("alice", [item(f"w{n}", f"guitar amp written {n}", day=100 + n)])
                    mem.add(f"other{n % 3}", [item(f"w{n}", f"drum sticks {n}")])
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                done.set()

        def read(seen: list[int]) -> None:
            try:
                while not done.is_set():
                    hits = mem.search("alice", "guitar amp", k=10)
                    assert len(hits) == 10 and all("guitar amp" in h.text for h in hits)
                    seen.append(mem.count("alice"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write)]
        threads += [threading.Thread(target=read, args=(seen,)) for seen in seen_counts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors[:1]
        assert all(len(seen) > 3 and seen == sorted(seen) for seen in seen_counts)
        assert len(set(sum(seen_counts, []))) > 1  # the readers saw the writes arrive
        assert mem.count("alice") == 220 and mem.count() == 220 + 200


KILL_WRITER = """
import sys
from datetime import datetime
from persona_dspy.data.records import HistoryItem
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.episodic import EpisodicMemory
spec = get_task("LaMP_3")
mem = EpisodicMemory(sys.argv[1])
n = 0
while True:
    batch = [HistoryItem.from_fields(spec, f"i{n}-{j}", datetime(2020, 1, 1), {"text": f"guitar amp {n} {j}",
             "score": "4"}, n) for j in range(3)]
    mem.add(f"user{n % 4}", batch)
    print(n, flush=True)
    n += 1
"""


def test_kill_9_during_ingest_loses_no_acknowledged_write(tmp_path, bm25_embedder):
    import os
    import signal
    import time

    store = tmp_path / "mem"
    child = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(store)], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    deadline = time.monotonic() + 120
    while len(acked) < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    acked += [int(x) for x in child.stdout.read().split()]  # printed before the kill
    assert len(acked) >= 150, "the writer did not get going"
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:  # opens: the lock died with the process
        stored = {(u, p.item_id) for u in mem.users() for p in mem.items(u)}
        missing = [n for n in acked if any((f"user{n % 4}", f"i{n}-{j}") not in stored for j in range(3))]
        assert not missing, f"{len(missing)} acknowledged adds lost, e.g. {missing[:5]}"
        assert mem.search("user0", "guitar amp 0", k=3)
        mem.add("user0", [item("after", "written after the crash")])
        assert mem.count("user0") >= 1 + 3 * len([n for n in acked if n % 4 == 0])


def test_old_local_mode_layout_is_refused_with_the_way_out(tmp_path, bm25_embedder):
    folder = tmp_path / "old"
    client = QdrantClient(path=str(folder))
    client.create_collection("persona_dspy__u_0123", vectors_config={})
    client.close()
    with pytest.raises(MemoryStoreError, match="local-mode layout.*persona-dspy memory copy --from"):
        EpisodicMemory(folder, embedder=bm25_embedder)


def test_a_shard_held_elsewhere_gives_a_clear_error(tmp_path, bm25_embedder):
    """Edge's own WAL lock (a plain Exception saying WouldBlock) becomes a MemoryStoreError naming the folder."""
    from qdrant_edge import EdgeShard

    from persona_dspy.memory.edge import user_dir_name

    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        mem.add("alice", [item("i0", "guitar amp")])
    held = EdgeShard.load(str(store / "edge" / "persona_dspy" / user_dir_name("alice") / "shard"))
    try:
        with EpisodicMemory(store, embedder=bm25_embedder) as mem:
            with pytest.raises(MemoryStoreError, match=f"memory folder {store} is in use by another process"):
                mem.search("alice", "guitar")
    finally:
        held.close()
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        assert [h.item_id for h in mem.search("alice", "guitar")] == ["i0"]


def test_a_forgotten_temporary_memory_removes_its_folder(bm25_embedder):
    import gc

    mem = EpisodicMemory(":memory:", embedder=bm25_embedder)
    mem.add("alice", [item("i0", "guitar amp")])
    folder = mem.store.folder
    assert folder.is_dir()
    del mem
    gc.collect()
    assert not folder.exists()


def test_temporary_folders_of_killed_processes_are_removed(bm25_embedder):
    import os
    import signal

    from persona_dspy.memory.episodic import _temporary_folder

    script = "from persona_dspy.memory.episodic import EpisodicMemory\nm = EpisodicMemory(':memory:')\n" \
             "print(m.store.folder, flush=True)\nimport time; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    from pathlib import Path

    abandoned = Path(child.stdout.readline().strip())
    with EpisodicMemory(":memory:", embedder=bm25_embedder) as alive:
        _temporary_folder(stale_after_s=0).rmdir()
        assert abandoned.is_dir() and alive.store.folder.is_dir()  # held by live processes: kept
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        _temporary_folder(stale_after_s=0).rmdir()
        assert not abandoned.exists() and alive.store.folder.is_dir()
