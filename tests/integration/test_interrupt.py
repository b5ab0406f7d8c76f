"""Ctrl-C and SIGTERM against a real run: the CLI in a subprocess, the scripted LM server answering slowly.

The first signal stops handing out users; in flight ones finish or are abandoned within a few seconds; what
completed is written; the exit code is 130 with no traceback; a second Ctrl-C exits at once; a rerun resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_server import loopback_fixture

from persona_dspy.evaluation.runner import INTERRUPT_GRACE

REPO = Path(__file__).resolve().parents[2]
server = loopback_fixture()
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def start(tmp_path: Path, server, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "PERSONA_DSPY_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    for name in ("PERSONA_DSPY_LM", "PERSONA_DSPY_API_BASE", "PERSONA_DSPY_OPTIMIZER_LM"):
        env.pop(name, None)
    command = [sys.executable, "-m", "persona_dspy.cli", *argv, "--task", "LaMP_3", "--lm", "openai/test-model",
               "--api-base", server.api_base, "--memory", str(tmp_path / "mem"), "--timeout", "60", "--no-progress"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def programs(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.json") if p.name != "compile_summary.json"] if folder.exists() else []


def test_sigint_stops_compile_writes_what_completed_and_a_rerun_resumes(tmp_path, server):
    out = tmp_path / "programs"
    server.reset(latency=0.6)
    proc = start(tmp_path, server, "compile", "--out", str(out), "--workers", "2", "--iterations", "1")
    wait_for(lambda: programs(out) or proc.poll() is not None)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - signalled
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "persona-dspy: stopping" in stderr and "interrupted" in stderr
    assert elapsed < INTERRUPT_GRACE + 10, elapsed  # in-flight users finish or are abandoned within the grace
    summary = json.loads((out / "compile_summary.json").read_text())
    assert summary["interrupted"] is True and summary["not_done"]
    done = {r["user_id"] for r in summary["results"]}
    assert done and len(done) + len(summary["not_done"]) == 6 and "INTERRUPTED" in stdout
    assert {p.name for p in programs(out)} >= {Path(r["path"]).name for r in summary["results"]}

    server.reset()
    proc = start(tmp_path, server, "compile", "--out", str(out), "--workers", "2", "--iterations", "1")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "compile_summary.json").read_text())
    statuses = {r["user_id"]: r["status"] for r in summary["results"]}
    assert {u for u, s in statuses.items() if s == "skipped"} == done  # finished users are not redone
    assert len(summary["users"]) == 6 and len(programs(out)) == 6 and not summary["interrupted"]


def test_second_sigint_exits_at_once(tmp_path, server):
    server.reset(latency=5.0)  # every user is still waiting on the server when the signals come
    proc = start(tmp_path, server, "eval", "--workers", "2", "--out", str(tmp_path / "report.json"))
    wait_for(lambda: server.stats()["chat_requests"] > 0 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped at once" in stderr and "Traceback" not in stderr
    assert time.monotonic() - signalled < 3


def test_sigterm_stops_eval_and_writes_the_report(tmp_path, server):
    server.reset(latency=5.0)
    report = tmp_path / "report.json"
    proc = start(tmp_path, server, "eval", "--workers", "2", "--out", str(report))
    wait_for(lambda: server.stats()["chat_requests"] > 0 or proc.poll() is not None)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
    assert "Traceback" not in stderr and time.monotonic() - signalled < INTERRUPT_GRACE + 10
    written = json.loads(report.read_text())
    assert written["interrupted"] is True and len(written["skipped_users"]) == 6  # both in flight were abandoned
