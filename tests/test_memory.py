"""Episodic memory: storage, time and scope filters, isolation between users, persistence, bad input."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta

import pytest

from persona_dspy.data.records import HistoryItem, Query, UserHistory
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig, EmbeddingModelError
from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError, point_id
from persona_dspy.memory.retrieval import MemoryRetrieval, memory_search_tool

SPEC = get_task("LaMP_3")
TOPICS = ["guitar amp", "drum sticks", "piano keys", "violin bow", "microphone stand", "guitar strings",
          "tuner pedal", "audio cable", "bass guitar", "ukulele case"]


def item(item_id: str, text: str, score: int = 5, day: int | None = 1, position: int = 0) -> HistoryItem:
    date = datetime(2020, 1, 1) + timedelta(days=day) if day is not None else None
    return HistoryItem.from_fields(SPEC, item_id, date, {"text": text, "score": str(score)}, position)


@pytest.fixture()
def memory(bm25_embedder):
    with EpisodicMemory(":memory:", embedder=bm25_embedder) as mem:
        yield mem


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


@pytest.mark.parametrize("layout", ["per_user", "shared"])
def test_isolation_many_users_random_queries(bm25_embedder, layout):
    """Users share item ids and vocabulary; no search may ever return another user's item."""
    rng = random.Random(1234)
    with EpisodicMemory(":memory:", embedder=bm25_embedder, layout=layout) as mem:
        owners: dict[str, set[str]] = {}
        for u in range(40):
            user = f"user-{u}"
            texts = [f"{rng.choice(TOPICS)} {rng.choice(TOPICS)} owner{u}" for _ in range(rng.randint(3, 25))]
            mem.add(user, [item(f"i{n}", t, day=n, position=n) for n, t in enumerate(texts)])
            owners[user] = {t for t in texts}
        for _ in range(300):
            user = f"user-{rng.randrange(40)}"
            query = " ".join(rng.sample(TOPICS, 2)) + f" owner{rng.randrange(40)}"
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
        assert "LOCKED" in out.stdout and "another process" in out.stdout, out.stderr[-2000:]
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


def test_dense_and_hybrid_search(hybrid_embedder):
    with EpisodicMemory(":memory:", embedder=hybrid_embedder) as mem:
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


@pytest.mark.parametrize("mode", ["sparse", "dense", "hybrid"])
def test_local_index_gives_qdrants_own_results(request, bm25_embedder, mode):
    """The numpy mirror must rank and score exactly as Qdrant's query_points on the same data and filters."""
    embedder = bm25_embedder if mode == "sparse" else request.getfixturevalue("hybrid_embedder")
    rng = random.Random(99)
    words = " ".join(TOPICS).split() + ["warm", "loud", "cheap", "broken", "great", "tone", "price", "quality"]
    words += [f"{w}{j}" for w in ("model", "brand", "color", "size") for j in range(12)]
    # Distinct lengths keep BM25 scores from tying (Qdrant leaves the order of ties unspecified).
    items = [item(f"i{n}", " ".join(rng.choices(words, k=3 + n)), score=1 + n % 5,
                  day=rng.choice([None, *range(60)]), position=n) for n in range(200)]
    with EpisodicMemory(":memory:", embedder=embedder) as fast, \
            EpisodicMemory(":memory:", embedder=embedder, local_index=False) as plain:
        fast.add("alice", items)
        plain.add("alice", items)
        checked = 0
        for step in range(150):
            if step == 75:  # writes to a built mirror: replaced items and new ones, applied in place
                changed = [item(f"i{n}", " ".join(rng.choices(words, k=3 + n)), score=1 + (n + 1) % 5,
                                day=rng.choice([None, *range(60)]), position=n) for n in rng.sample(range(200), 30)]
                changed += [item(f"new{n}", " ".join(rng.choices(words, k=210 + n)), day=n, position=200 + n)
                            for n in range(20)]
                fast.add("alice", changed)
                plain.add("alice", changed)
            query = " ".join(rng.sample(words, rng.randint(1, 4)))
            kwargs = {"k": rng.randint(1, 25)}
            if rng.random() < 0.5:
                kwargs["before"] = datetime(2020, 1, 1) + timedelta(days=rng.randint(0, 60))
            if rng.random() < 0.5:
                kwargs["within_ids"] = [f"i{n}" for n in rng.sample(range(200), 80)]
            if rng.random() < 0.5:
                kwargs["exclude_ids"] = [f"i{n}" for n in rng.sample(range(200), 20)]
            if mode == "hybrid" and _component_ties(plain, query, kwargs):
                continue  # fusion ranks depend on how ties were ordered, which Qdrant leaves unspecified
            checked += 1
            got = fast.search("alice", query, mode=mode, **kwargs)
            want = plain.search("alice", query, mode=mode, **kwargs)
            assert len(got) == len(want), (query, kwargs)
            assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5), (query, kwargs)
            everything = [h.score for h in plain.search("alice", query, mode=mode, **(kwargs | {"k": 250}))]
            for g, w in zip(got, want, strict=True):
                tied = sum(abs(s - w.score) <= 1e-4 * max(1.0, abs(s)) for s in everything) > 1
                if not tied:  # tied scores may come in either order
                    assert g.item_id == w.item_id, (query, kwargs)
        assert checked >= 20
        assert fast.count("alice") == plain.count("alice") == 220
        fast.add("alice", [item("new", "loud warm tone guitar amp", day=3)])  # a write refreshes the mirror
        assert [h.item_id for h in fast.search("alice", "loud warm tone", mode=mode, within_ids=["new"])] == ["new"]


def _component_ties(memory: EpisodicMemory, query: str, kwargs: dict) -> bool:
    depth = max(4 * kwargs["k"], 40)
    for mode in ("sparse", "dense"):
        scores = [h.score for h in memory.search("alice", query, mode=mode, **(kwargs | {"k": depth + 1}))]
        if any(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(scores, scores[1:], strict=False)):
            return True
    return False


def test_local_index_built_from_an_existing_store_matches_qdrant(tmp_path, bm25_embedder):
    """A store opened from disk is mirrored by a scroll on first search; it must rank exactly as Qdrant does."""
    rng = random.Random(5)
    words = " ".join(TOPICS).split() + [f"brand{j}" for j in range(30)]
    items = [item(f"i{n}", " ".join(rng.choices(words, k=3 + n)), day=rng.randint(0, 40), position=n)
             for n in range(150)]
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder, local_index=False) as writer:
        writer.add("alice", items)
    with EpisodicMemory(store, embedder=bm25_embedder) as fast, \
            EpisodicMemory(store, embedder=bm25_embedder, local_index=False) as plain:  # one shared client
        for step in range(60):
            if step == 30:
                fast.add("alice", [item("i3", "guitar amp brand1 brand2", day=2), item("n1", "drum sticks", day=9)])
            query = " ".join(rng.sample(words, 2))
            before = datetime(2020, 1, 1) + timedelta(days=rng.randint(0, 40))
            got = fast.search("alice", query, k=10, before=before)
            want = plain.search("alice", query, k=10, before=before)
            assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5), query


def test_memories_on_one_folder_share_one_view(tmp_path, bm25_embedder):
    """Writes and deletes through one memory are seen by the other (they share the client and its mirror)."""
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as a, EpisodicMemory(store, embedder=bm25_embedder) as b:
        a.add("u", [item("x", "guitar amp")])
        assert [h.item_id for h in a.search("u", "guitar")] == ["x"]  # a's mirror is built
        b.add("u", [item("y", "drum sticks")])
        assert [h.item_id for h in a.search("u", "drum")] == ["y"]
        b.delete_user("u")
        assert a.search("u", "guitar") == [] and a.count("u") == 0
        b.add("u", [item("z", "piano keys")])
        a.add("u", [item("w", "violin bow")])  # a must recreate nothing and write into b's new collection
        assert {h.item_id for h in a.search("u", "piano keys violin bow", k=5)} == {"z", "w"}
        assert a.search("u", "guitar") == []


def test_index_eviction_and_compaction_keep_results_right(bm25_embedder):
    with EpisodicMemory(":memory:", embedder=bm25_embedder) as mem:
        mem._store.mirror.max_users = 2
        for u in range(5):
            mem.add(f"user{u}", [item("a", f"guitar amp owner{u}"), item("b", f"drum sticks owner{u}")])
        for u in range(5):  # most indexes were evicted and are rebuilt from Qdrant on demand
            assert [h.text for h in mem.search(f"user{u}", "guitar")] == [f"guitar amp owner{u}"]
        mem.search("user0", "guitar")  # user0's index is mirrored again
        for n in range(300):  # rewriting one item leaves dead rows that must be compacted away
            mem.add("user0", [item("a", f"guitar amp version {n}", day=1)])
        index = mem._store.mirror.cached(mem.layout.collection("user0"))
        assert len(index) == 2 and len(index.ids) <= 2 * 2 + 64
        assert [h.text for h in mem.search("user0", "guitar")] == ["guitar amp version 299"]


def test_equal_scores_rank_by_point_id_however_the_index_was_built(tmp_path, bm25_embedder):
    same = [item(f"i{n}", "guitar amp", day=n, position=n) for n in range(12)]
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as written:
        written.add("alice", same)
        from_writes = [h.item_id for h in written.search("alice", "guitar", k=12)]
    with EpisodicMemory(store, embedder=bm25_embedder) as reopened:
        from_scroll = [h.item_id for h in reopened.search("alice", "guitar", k=12)]
    assert from_writes == from_scroll == sorted(from_writes, key=lambda i: point_id("alice", i))


def test_concurrent_writers_and_readers_stay_consistent_with_qdrant(bm25_embedder):
    import threading

    with EpisodicMemory(":memory:", embedder=bm25_embedder) as mem, \
            EpisodicMemory(":memory:", embedder=bm25_embedder, local_index=False) as plain:
        errors: list[BaseException] = []

        def work(user: str) -> None:
            try:
                for n in range(30):
                    batch = [item(f"i{n % 7}", f"guitar amp take {n} {user}", day=n)]
                    mem.add(user, batch)
                    plain.add(user, batch)
                    mem.search(user, "guitar amp", k=3)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"u{t % 3}",)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for u in range(3):
            got = mem.search(f"u{u}", "guitar amp take", k=7)
            want = plain.search(f"u{u}", "guitar amp take", k=7)
            assert sorted(h.text for h in got) == sorted(h.text for h in want)
            assert mem.count(f"u{u}") == 7
