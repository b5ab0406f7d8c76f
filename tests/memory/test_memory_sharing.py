"""The rule for memories across worker processes: on one Edge folder, several processes in shared mode, each
opening only its own users; never two processes on one user's store, never a shared and an exclusive opener."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime

import pytest

from persona_dspy.data.records import HistoryItem
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError


def item(item_id: str, text: str) -> HistoryItem:
    return HistoryItem.from_fields(get_task("LaMP_3"), item_id, datetime(2020, 1, 2), {"text": text, "score": "5"}, 0)


def holder(store, user: str) -> subprocess.Popen[str]:
    """Another process with ``store`` open in shared mode, holding ``user``'s shard until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from persona_dspy.memory.episodic import EpisodicMemory
        with EpisodicMemory({str(store)!r}, shared=True) as mem:
            mem.search({user!r}, "guitar")
            print("HELD", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("HELD"), proc.stderr.read()[-2000:]
    return proc


def exclusive_probe(store) -> str:
    code = textwrap.dedent(f"""
        from persona_dspy.memory.episodic import EpisodicMemory, MemoryStoreError
        try:
            with EpisodicMemory({str(store)!r}) as mem:
                print("OPEN", mem.count("bob"))
        except MemoryStoreError as exc:
            print("REFUSED", exc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout


def test_workers_share_a_folder_each_with_its_own_users(tmp_path, bm25_embedder):
    store = tmp_path / "mem"
    with EpisodicMemory(store, embedder=bm25_embedder) as mem:
        mem.add("alice", [item("a0", "guitar amp")])
        mem.add("bob", [item("b0", "guitar strings")])
    other = holder(store, "alice")
    try:
        with EpisodicMemory(store, embedder=bm25_embedder, shared=True) as mine:
            assert [h.item_id for h in mine.search("bob", "guitar")] == ["b0"]  # my own user: fine
            mine.add("carol", [item("c0", "guitar picks")])  # a new user of mine: created beside the other worker
            with pytest.raises(MemoryStoreError, match="user 'alice'.*open in another process"):
                mine.search("alice", "guitar")  # the other worker's user: refused, never opened twice
            with pytest.raises(MemoryStoreError, match="open in shared mode in this process"):
                EpisodicMemory(store, embedder=bm25_embedder)
        out = exclusive_probe(store)  # the other worker still holds the folder in shared mode
        assert out.startswith("REFUSED") and "in use by another process" in out, out
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert exclusive_probe(store).startswith("OPEN 1")  # every worker gone: one process may have it alone again
    with EpisodicMemory(store, embedder=bm25_embedder) as alone:
        assert sorted(alone.users()) == ["alice", "bob", "carol"]
        worker = textwrap.dedent(f"""
            from persona_dspy.memory.episodic import EpisodicMemory
            EpisodicMemory({str(store)!r}, shared=True)
        """)
        refused = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120)
        assert "MemoryStoreError" in refused.stderr and "opened it alone" in refused.stderr  # no worker gets in
