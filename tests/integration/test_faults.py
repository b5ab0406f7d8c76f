"""Faults leave a trace: every HTTP request is counted (retries, timeouts, hedges), a hung request is sent again and
the abandoned copy closed on the server, a data problem names the data, and a killed memory rebuild loses no user.

The scripted server (``loopback_server.py``) injects HTTP 500s and hangs and counts what it received; the client's
counts must equal it. Hangs are short here and nothing asserts a duration (``benchmarks/faults.py`` measures).
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest
from loopback_server import loopback_fixture
from persona_dspy.signatures.task_signatures import task_signature
from test_cli import isolated  # noqa: F401  (autouse: no runner LM settings, PERSONA_DSPY_HOME in tmp_path)

from persona_dspy.cli import main
from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.lm import attempts
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.usage import LMUsage

server = loopback_fixture(max_seconds=900)
REPO = Path(__file__).resolve().parents[2]
USERS = [h.user_id for h in load_dataset(dataset_dir("LaMP_3"))]


@pytest.fixture(autouse=True)
def fresh_servers():
    """Latencies and hedging settings are per process: each test starts from none."""
    attempts.unwatch_all()
    yield
    attempts.unwatch_all()


def _calls(lm: dspy.LM, n: int, workers: int = 4) -> list[str]:
    """``n`` answers from ``workers`` threads, each in a copy of this context (the counters active here count)."""
    contexts = [contextvars.copy_context() for _ in range(n)]

    def one(i: int) -> str:
        with dspy.context(lm=lm):
            return dspy.Predict(task_signature("LaMP_3"))(query=f"q{i}", context=f"score: {1 + i % 5}").answer

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: contexts[i].run(one, i), range(n)))


def test_every_request_is_counted_under_500s_and_hangs(server):
    """Retries after a 500, requests that timed out, hedges and abandoned copies: the client's count is the server's."""
    server.reset(fail_rate=0.2, hang_rate=0.1, hang_seconds=4.0, seed=3)
    lm = build_lm("openai/test-model", api_base=server.api_base, timeout=3.0, num_retries=8)
    attempts.watch(server.api_base)
    usage = LMUsage()
    with usage.counting(lm):
        answers = _calls(lm, 60)
    assert answers == [str(1 + i % 5) for i in range(60)]
    stats = server.stats()
    snap = usage.snapshot()
    assert stats["failures"] > 0 and stats["hangs"] > 0
    assert snap["calls"] == 60 and snap["requests"] == stats["chat_requests"]
    failed = snap["failed_requests"]
    assert failed["http_error"] == stats["failures"]
    assert snap["errors"] == sum(failed.values()) and snap["failed_calls"] == 0
    assert snap["requests"] - snap["errors"] == 60  # every call answered exactly once


def test_a_hung_request_is_hedged_and_the_copy_left_behind_is_closed(server):
    """Once the latency is known, a request the server sits on is sent again; the first answer is taken and the
    hung copy's connection is closed, which the server sees as its client leaving."""
    server.reset()
    lm = build_lm("openai/test-model", api_base=server.api_base, timeout=60, num_retries=0)
    state = attempts.watch(server.api_base)
    _calls(lm, attempts.MIN_SAMPLES + 5)
    assert state.hedge_delay() >= attempts.HEDGE_FLOOR  # known now: 2x its p95, at least the floor
    server.reset(hang_rate=1.0, hang_seconds=20, seed=1)  # the next request hangs
    usage = LMUsage()
    with usage.counting(lm), ThreadPoolExecutor(1) as pool:
        context = contextvars.copy_context()
        future = pool.submit(context.run, _calls, lm, 1, 1)
        _wait(lambda: server.stats()["hangs"] >= 1)
        server.post("/_script", {"hang_rate": 0.0})  # its copy, sent a second later, is answered
        assert future.result(timeout=60) == ["1"]
    snap = usage.snapshot()
    stats = server.stats()
    assert snap["requests"] == stats["chat_requests"] >= 2
    assert snap["failed_requests"].get("abandoned", 0) >= 1
    _wait(lambda: server.stats()["disconnected"] >= 1)  # the hung copy was closed, not left to run


def test_a_request_that_times_out_is_counted_and_closed_on_the_server(server):
    server.reset(hang_rate=1.0, hang_seconds=20, seed=2)
    lm = build_lm("openai/test-model", api_base=server.api_base, timeout=0.5, num_retries=1)
    usage = LMUsage()
    with usage.counting(lm), pytest.raises(Exception, match="timeout"):
        _calls(lm, 1, 1)
    snap = usage.snapshot()
    assert snap["requests"] == 2 == server.stats()["chat_requests"]
    assert snap["failed_requests"] == {"timeout": 2} and snap["errors"] == 2 and snap["failed_calls"] == 1
    _wait(lambda: server.stats()["disconnected"] == 2)


def _wait(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never saw it"
        time.sleep(0.05)


def test_compile_reports_every_request_the_server_received(server, tmp_path, capsys):
    """The counts line, compile_summary.json and each program's lm_usage carry the requests, errors included."""
    server.reset(fail_rate=0.2, hang_rate=0.1, hang_seconds=1.5, seed=5)
    out = tmp_path / "programs"
    code = main(["compile", "--task", "LaMP_3", "--lm", "openai/test-model", "--api-base", server.api_base,
                 "--memory", ":memory:", "--out", str(out), "--users", *USERS[:2], "--workers", "2", "--retries", "8",
                 "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    stats = server.stats()
    summary = json.loads((out / "compile_summary.json").read_text())
    assert stats["failures"] > 0 and summary["requests"] == stats["chat_requests"] > summary["lm_calls"]
    totals = summary["output_totals"]
    assert totals["requests"] == summary["requests"] and totals["failed_requests"]["http_error"] == stats["failures"]
    assert f"{summary['lm_calls']} LM calls, {summary['requests']} HTTP requests (" in stdout
    usages = [json.loads(Path(r["path"]).read_text())["metadata"]["alignment"]["lm_usage"]
              for r in summary["results"]]
    assert sum(u["requests"] for u in usages) <= summary["requests"]  # the aligner's share of each user's
    assert sum(u["errors"] for u in usages) > 0


def test_compile_help_states_the_timeouts(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 60; 600 for the embedded model" in text
    assert "for another server on this machine" in text and "/props" in text and "between 10 and 60" in text
    assert "is sent again (up to 4 copies, at doubling intervals) and the first reply taken" in text


def test_an_empty_profile_is_reported_as_the_datas_fault(tmp_path, capsys):
    data = tmp_path / "lamp3"
    shutil.copytree(dataset_dir("LaMP_3"), data)
    questions = json.loads((data / "dev_questions.json").read_text())
    for question in questions:
        if question["user_id"] == USERS[0]:
            question["profile"] = []
    (data / "dev_questions.json").write_text(json.dumps(questions))
    code = main(["compile", "--task", "LaMP_3", "--lm", "offline", "--data", str(data), "--memory", ":memory:",
                 "--out", str(tmp_path / "programs"), "--users", *USERS[:2], "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 1
    assert "1 user failed because of the data, not the model" in stderr
    assert str(data / "dev_questions.json") in stderr and repr(USERS[0]) in stderr and "empty profile" in stderr


# --------------------------------------------------------------------------- memory rebuild, killed


def _stored(memory_dir: Path) -> dict[str, int]:
    from persona_dspy.memory.episodic import EpisodicMemory

    with EpisodicMemory.for_task("LaMP_3", memory_dir) as memory:
        return {user: memory.count(user) for user in memory.users()}


def _halved_profiles(tmp_path: Path) -> Path:
    data = tmp_path / "lamp3-half"
    shutil.copytree(dataset_dir("LaMP_3"), data)
    questions = json.loads((data / "dev_questions.json").read_text())
    for question in questions:
        question["profile"] = question["profile"][: len(question["profile"]) // 2]
    (data / "dev_questions.json").write_text(json.dumps(questions))
    return data


@pytest.mark.parametrize("kill_after", ["start", 0.0, 0.15, 0.4, 0.8, 1.5, None])
def test_a_killed_rebuild_leaves_the_old_or_the_new_memory_whole(tmp_path, capsys, kill_after):
    """kill -9 at several points of ``memory rebuild``: every user has all the old items or all the new, never a
    mix or nothing; an uninterrupted rebuild swaps in the new memory."""
    full, half = dataset_dir("LaMP_3"), _halved_profiles(tmp_path)
    counts = {folder: {h.user_id: len(h.items) for h in load_dataset(folder)} for folder in (full, half)}
    assert counts[full] != counts[half]
    memory = tmp_path / "memory"
    assert main(["ingest", "--task", "LaMP_3", "--data", str(full), "--memory", str(memory), "--no-progress"]) == 0
    assert _stored(memory) == counts[full]
    command = [sys.executable, "-m", "persona_dspy.cli", "memory", "rebuild", "--task", "LaMP_3", "--data", str(half),
               "--memory", str(memory), "--yes", "--no-progress"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    staging = memory / ".rebuild-pd_lamp_3"
    if kill_after == "start":
        pass  # killed as it starts: before it has read anything
    elif kill_after is not None:
        while not staging.exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(kill_after)
    if kill_after is None:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    else:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        if kill_after in ("start", 0.0):  # these land mid-run (a rebuild takes ~0.3 s idle): the kill was real
            assert proc.returncode == -signal.SIGKILL
    after = _stored(memory)
    assert after in (counts[full], counts[half]), f"killed {kill_after} s in: {after}"
    if kill_after is None:
        assert after == counts[half] and not staging.exists()
    # whatever a kill left behind, the next rebuild finishes the job
    assert main(["memory", "rebuild", "--task", "LaMP_3", "--data", str(full), "--memory", str(memory), "--yes",
                 "--no-progress"]) == 0
    assert _stored(memory) == counts[full] and not staging.exists()
    capsys.readouterr()


def test_a_pool_counts_the_requests_of_every_server(server):
    """A pool hides its servers' calls from the counters (the call counts once) but not their HTTP requests."""
    from loopback_server import LoopbackServer

    from persona_dspy.lm.pool import pool_lm
    from persona_dspy.lm.usage import METER

    with LoopbackServer() as other:
        for each in (server, other):
            each.reset(fail_rate=0.3, seed=7)
        per_server = [(url, build_lm("openai/test-model", url, timeout=5, num_retries=0))
                      for url in (server.api_base, other.api_base)]
        lm = pool_lm(per_server, cooldown=0.05, retries=6, callbacks=[METER])
        usage = LMUsage()
        with usage.counting(lm):
            assert _calls(lm, 20) == [str(1 + i % 5) for i in range(20)]
        received = server.stats()["chat_requests"] + other.stats()["chat_requests"]
        failures = server.stats()["failures"] + other.stats()["failures"]
    snap = usage.snapshot()
    assert failures > 0 and snap["calls"] == 20
    assert snap["requests"] == received and snap["failed_requests"] == {"http_error": failures}


def test_a_loopback_servers_timeout_is_60_s_then_follows_its_latency_and_slots(server):
    from persona_dspy.lm.config import lm_config
    from persona_dspy.lm.server_fit import fit_to_server, watch_servers

    server.reset(n_ctx=8192)  # /props answers as llama.cpp's: one slot
    config = lm_config("openai/test-model", server.api_base)
    fit = fit_to_server(config, workers=4)
    watch_servers(config)
    state = attempts.server_state(server.api_base)
    assert build_lm(config).kwargs["timeout"] == 60.0 and fit.workers == 1  # capped at its slots
    assert state.adapt_timeout and state.slots == 1 and state.ceiling == 60.0 and state.hedge
    assert state.read_timeout() is None  # latency not known yet: the LM's 60 s
    for seconds in [0.1] * 18 + [0.5] * 2:
        state.record(seconds)
    assert state.p95() == 0.5
    state.in_flight = 3  # three requests in flight on one slot: each waits for those before it
    assert state.read_timeout() == pytest.approx(attempts.TIMEOUT_FACTOR * 0.5 * 3)
    state.in_flight = 9
    assert state.read_timeout() == 60.0  # never above the LM's own
    state.in_flight = 0
    for seconds in [0.01] * 40:
        state.record(seconds)
    assert state.read_timeout() == attempts.TIMEOUT_FLOOR
    attempts.unwatch_all()
    watch_servers(config.copy(timeout=30.0))
    assert not attempts.server_state(server.api_base).adapt_timeout  # --timeout given: as given


def test_the_embedded_server_is_never_hedged(monkeypatch):
    import types

    fake = types.SimpleNamespace(served_by=lambda url: {"model": "SmolLM2"} if "8123" in url else None)
    monkeypatch.setitem(sys.modules, "persona_dspy.lm.local_server", fake)
    with pytest.raises(ValueError, match="never hedged"):
        attempts.watch("http://127.0.0.1:8123/v1")
    assert not attempts.server_state("http://127.0.0.1:8123/v1").hedge


def test_a_rebuild_of_some_users_keeps_the_others_as_they_were(tmp_path, capsys):
    full, half = dataset_dir("LaMP_3"), _halved_profiles(tmp_path)
    counts = {folder: {h.user_id: len(h.items) for h in load_dataset(folder)} for folder in (full, half)}
    memory = tmp_path / "memory"
    assert main(["ingest", "--task", "LaMP_3", "--data", str(full), "--memory", str(memory), "--no-progress"]) == 0
    assert main(["memory", "rebuild", "--task", "LaMP_3", "--data", str(half), "--memory", str(memory), "--users",
                 USERS[0], "--yes", "--no-progress"]) == 0
    assert _stored(memory) == {**counts[full], USERS[0]: counts[half][USERS[0]]}
    assert not (memory / ".rebuild-pd_lamp_3").exists()
    # the kept users' shards still open, search and take writes
    assert main(["ingest", "--task", "LaMP_3", "--data", str(full), "--memory", str(memory), "--no-progress"]) == 0
    assert _stored(memory) == counts[full]
    capsys.readouterr()
