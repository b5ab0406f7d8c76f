"""Many-user compile: programs per user, resumable, failures isolated, nothing lost to a kill -9."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dspy
import pytest

from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.jobs.compile import SUMMARY_FILE, compile_users, program_path
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.programs import load_program, read_program_metadata
from persona_dspy.testing.offline_lm import Message, OfflineEngine, TextPart, offline_lm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3")


def test_compile_writes_a_loadable_program_per_user_and_resumes(lamp3, tmp_path):
    histories, memory = lamp3
    first = compile_users(histories, memory=memory, out_dir=tmp_path, lm=offline_lm(), workers=3, progress=False)
    assert first.count("compiled") == len(histories) and first.count("failed") == 0
    for history in histories:
        path = program_path(tmp_path, history.user_id)
        agent = load_program(path, memory, user_id=history.user_id, task="LaMP_3")
        metadata = read_program_metadata(path)
        assert metadata["optimizer"] == "PersonaAligner" and metadata["lm"]["model"] == "offline/stand-in"
        assert agent.persona == metadata["persona"]
        assert metadata["dev_scores"]["best"] >= metadata["dev_scores"]["start"]
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["compiled"] == len(histories) and summary["lm_calls"] == first.lm_calls > 0
    assert first.lm_calls == sum(r.lm_calls for r in first.results)  # the total is the users' calls

    again = compile_users(histories, memory=memory, out_dir=tmp_path, lm=offline_lm(), workers=3, progress=False)
    assert again.count("skipped") == len(histories) and again.lm_calls == 0

    one = histories[0].user_id
    forced = compile_users(histories, memory=memory, out_dir=tmp_path, lm=offline_lm(), users=[one], force=True,
                           progress=False)
    assert [r.user_id for r in forced.results] == [one] and forced.results[0].status == "compiled"


def test_new_interactions_realign_from_the_saved_persona(lamp3, tmp_path):
    histories, memory = lamp3
    compile_users(histories[:2], memory=memory, out_dir=tmp_path, lm=offline_lm(), n_recent=2, progress=False)
    before = {h.user_id: read_program_metadata(program_path(tmp_path, h.user_id)) for h in histories[:2]}
    later = compile_users(histories[:2], memory=memory, out_dir=tmp_path, lm=offline_lm(), n_recent=3,
                          progress=False)
    assert [r.status for r in later.results] == ["realigned", "realigned"]
    for history in histories[:2]:
        path = program_path(tmp_path, history.user_id)
        metadata = read_program_metadata(path)
        assert metadata["alignment"]["trainset_size"] + metadata["alignment"]["valset_size"] == 3  # 1 + 2 held back
        assert metadata["started_from"] == {"program_created": before[history.user_id]["created"],
                                            "persona": before[history.user_id]["persona"]}
        assert (path.parent / f"{path.name}.versions").is_dir()  # the earlier program was kept


def test_another_k_compiles_afresh_and_new_settings_realign(lamp3, tmp_path):
    """A program built for another k cannot be warm-started (its agent differs): it is compiled afresh."""
    histories, memory = lamp3
    compile_users(histories[:2], memory=memory, out_dir=tmp_path, lm=offline_lm(), progress=False)
    other_k = compile_users(histories[:2], memory=memory, out_dir=tmp_path, lm=offline_lm(), k=3, progress=False)
    assert [r.status for r in other_k.results] == ["compiled", "compiled"], [r.error for r in other_k.results]
    for history in histories[:2]:
        path = program_path(tmp_path, history.user_id)
        metadata = read_program_metadata(path)
        assert metadata["k"] == 3 and metadata["alignment_settings"]["k"] == 3
        assert "initial_persona" in metadata["started_from"]
        assert load_program(path, memory, user_id=history.user_id, task="LaMP_3").k == 3
        assert (path.parent / f"{path.name}.versions").is_dir()  # the k=5 program was kept
    tuned = compile_users(histories[:2], memory=memory, out_dir=tmp_path, lm=offline_lm(), k=3, iterations=1,
                          progress=False)
    assert [r.status for r in tuned.results] == ["realigned", "realigned"]


class FailingForOneUser(OfflineEngine):
    """A server that fails every request mentioning one user's text (as a 500 or timeout would)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def complete(self, request):
        if self.marker in str(request.messages):
            raise RuntimeError("server error 500")
        return super().complete(request)


def test_one_users_failure_does_not_stop_the_others(lamp3, tmp_path):
    histories, memory = lamp3
    victim = histories[1]
    marker = victim.recent_interactions(3)[-1].text[:40]
    lm = dspy.LM("offline/flaky", engine=FailingForOneUser(marker), cache=False, num_retries=0)
    summary = compile_users(histories, memory=memory, out_dir=tmp_path, lm=lm, workers=2, progress=False)
    failed = [r for r in summary.results if r.status == "failed"]
    assert [r.user_id for r in failed] == [victim.user_id]
    assert "server error 500" in failed[0].error
    assert summary.count("compiled") == len(histories) - 1
    assert not program_path(tmp_path, victim.user_id).exists()
    assert "FAILED" in summary.table()
    with pytest.raises(ValueError, match="unknown user"):
        compile_users(histories, memory=memory, out_dir=tmp_path, lm=lm, users=["nobody"], progress=False)


CRASH_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dspy
    from persona_dspy.jobs.compile import compile_users
    from persona_dspy.data.lamp import dataset_dir, load_dataset
    from persona_dspy.memory.episodic import EpisodicMemory
    from persona_dspy.testing.offline_lm import OfflineEngine

    OUT = Path(sys.argv[1])

    class Slow(OfflineEngine):
        # Once two programs are written every call hangs: the kill lands mid-run however loaded the machine is.
        def complete(self, request):
            if len([p for p in OUT.glob("*.json") if p.name != "compile_summary.json"]) >= 2:
                time.sleep(3600)
            time.sleep(0.01)
            return super().complete(request)

    histories = load_dataset(dataset_dir("LaMP_2N")) + []
    memory = EpisodicMemory(":memory:")
    memory.add_histories(histories)
    lm = dspy.LM("offline/slow", engine=Slow(), cache=False, num_retries=0)
    compile_users(histories, memory=memory, out_dir=sys.argv[1], lm=lm, workers=2, progress=False,
                  stop_when_perfect=False)
""")


def test_kill_9_mid_run_loses_no_written_program(tmp_path, bm25_embedder):
    out = tmp_path / "programs"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            written = [p for p in out.glob("*.json") if p.name != SUMMARY_FILE] if out.exists() else []
            if len(written) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"compile ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    histories = load_dataset(dataset_dir("LaMP_2N"))
    survivors = [p for p in out.glob("*.json") if p.name != SUMMARY_FILE]
    assert 2 <= len(survivors) < len(histories), "the kill should land mid-run"
    with EpisodicMemory(":memory:", embedder=bm25_embedder) as memory:
        memory.add_histories(histories)
        for path in survivors:  # every file that exists is a complete program
            metadata = read_program_metadata(path)
            load_program(path, memory, user_id=metadata["user_id"], task="LaMP_2N")
        resumed = compile_users(histories, memory=memory, out_dir=out, lm=offline_lm(), progress=False,
                                stop_when_perfect=False)
    assert resumed.count("skipped") == len(survivors)
    assert resumed.count("compiled") == len(histories) - len(survivors)


def test_tasks_without_past_answers_are_refused_up_front(tmp_path):
    from persona_dspy.data.records import HistoryItem, UserHistory
    from persona_dspy.data.tasks import get_task

    spec = get_task("LaMP_7")
    items = [HistoryItem.from_fields(spec, f"t{i}", None, {"text": f"tweet {i}"}, i) for i in range(5)]
    with pytest.raises(ValueError, match="nothing to align"):
        compile_users([UserHistory("u", "LaMP_7", items)], memory=None, out_dir=tmp_path, lm=offline_lm())


class Garbling(OfflineEngine):
    """The stand-in, but about one reply in five is prose that no adapter can parse (as a small model's often are).

    Which replies are garbled depends on the prompt alone, so the run is the same whatever the thread order.
    """

    TEXT = "I think this user would like it. Hard to say more without knowing them better."

    def __init__(self) -> None:
        super().__init__()
        self.garbled = 0

    def complete(self, request):
        reply = super().complete(request)
        if int(hashlib.sha256(repr(request.messages).encode()).hexdigest(), 16) % 5 == 0:
            self.garbled += 1
            return dataclasses.replace(reply, message=Message.assistant([TextPart(self.TEXT)]))
        return reply


def test_a_fifth_of_replies_unparsable_fails_no_user(lamp3, tmp_path):
    histories, memory = lamp3
    engine = Garbling()
    lm = dspy.LM("offline/stand-in", engine=engine, cache=False, num_retries=0)
    summary = compile_users(histories, memory=memory, out_dir=tmp_path, lm=lm, workers=2, progress=False,
                           n_recent=6)
    assert engine.garbled > 0 and summary.count("failed") == 0, summary.table()
    assert summary.count("compiled") == len(histories)
    fallbacks = summary.fallbacks()  # counted, not hidden (which steps were garbled depends on the prompts)
    assert fallbacks["answer"] > 0 and sum(fallbacks.values()) <= engine.garbled
    assert "unparsable replies kept as raw text" in summary.table()
    written = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert written["fallbacks"] == summary.fallbacks()
