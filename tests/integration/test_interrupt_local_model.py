"""Ctrl-C and SIGTERM against the embedded real model: compile, predict and eval stop within seconds.

Each command runs in a subprocess on SmolLM2 (``--lm local``, the default) until the embedded server is processing
one of its requests (its ``/metrics``), then gets the signal. It must exit 130 (SIGINT) or 143 (SIGTERM) without a
traceback, and be gone: llama.cpp's server used to hang the process in its destructor while requests were in flight.
Timings are recorded (``record_property`` and the output of ``-s``), never asserted tightly: the machine may be
loaded, so the bound is generous. The model must be cached (``persona-dspy models fetch``); else these tests skip.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from persona_dspy.lm.models import ModelError, resolve_model

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN = 60.0
"""Seconds after the signal by which the process must be gone (generous: it takes a few on an idle machine)."""
LAMP3_USER = "A1L7M2JXN4EZCR"
LAMP3_QUERY = "300010"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


@pytest.fixture(scope="module", autouse=True)
def real_model() -> Path:
    try:
        return resolve_model(fetch=False)
    except ModelError as exc:
        pytest.skip(f"the real local model is not cached ({exc}); `.ci/run` fetches it")


COMMANDS = {
    "compile": ["compile", "--max-users", "2", "--iterations", "1", "--no-progress"],
    "predict": ["predict", "--user", LAMP3_USER, "--query-id", LAMP3_QUERY, "--no-prompt-cache"],
    "eval": ["eval", "--max-users", "2", "--no-progress"],
}
"""What runs: each makes LM calls for well over the seconds it is given before the signal."""


def _requests_processing(root: str) -> int:
    try:
        with urllib.request.urlopen(f"{root}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0
    found = re.search(r"^llamacpp:requests_processing (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


class Run:
    def __init__(self, tmp_path: Path, command: str) -> None:
        env = {**os.environ, "PERSONA_DSPY_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
        for name in ("PERSONA_DSPY_LM", "PERSONA_DSPY_API_BASE", "PERSONA_DSPY_OPTIMIZER_LM"):
            env.pop(name, None)
        self.out = tmp_path / "out"
        argv = [sys.executable, "-m", "persona_dspy.cli", "-v", *COMMANDS[command], "--task", "LaMP_3",
                "--memory", str(tmp_path / "mem"), *(["--out", str(self.out)] if command != "predict" else [])]
        self.stderr_path = tmp_path / "stderr.txt"
        self.stderr_file = self.stderr_path.open("w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.stderr_file,
                                     text=True)

    def stderr(self) -> str:
        self.stderr_file.flush()
        return self.stderr_path.read_text()

    def wait_for_a_request(self) -> None:
        """Until the embedded server is processing one of the command's requests (its ``/metrics`` says so)."""
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, f"ended before a request was in flight:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no request in flight within 300 s:\n{self.stderr()}"
            found = re.search(r"local model server (http://\S+)/v1 ready", self.stderr())
            if found and _requests_processing(found.group(1)):
                return
            time.sleep(0.2)

    def signal(self, *signums: int) -> tuple[int, float, str, str]:
        """Send the signals (0.3 s apart); the exit code, seconds until the process was gone, stdout and stderr."""
        sent = time.monotonic()
        for i, signum in enumerate(signums):
            if i:
                time.sleep(0.3)
            self.proc.send_signal(signum)
        try:
            stdout, _ = self.proc.communicate(timeout=GONE_WITHIN)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail(f"still running {GONE_WITHIN:.0f} s after the signal:\n{self.stderr()[-3000:]}")
        seconds = time.monotonic() - sent
        self.stderr_file.close()
        return self.proc.returncode, seconds, stdout, self.stderr_path.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_signal_stops_a_command_on_the_embedded_model(tmp_path, command, signum, record_property):
    run = Run(tmp_path, command)
    run.wait_for_a_request()
    code, seconds, stdout, stderr = run.signal(signum)
    record_property("seconds_to_exit", round(seconds, 2))
    print(f"{command} {signal.Signals(signum).name}: exit {code} after {seconds:.2f} s")
    assert code == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped at once" not in stderr
    if command == "compile":  # the run says what it spent and records what it did
        summary = json.loads((run.out / "compile_summary.json").read_text())
        assert summary["interrupted"] is True and summary["lm_calls"] > 0
        assert re.search(r"\b[1-9]\d* LM calls,", stdout), stdout
    if command == "eval":
        assert json.loads(run.out.read_text())["interrupted"] is True


def test_a_second_ctrl_c_exits_at_once_on_the_embedded_model(tmp_path, record_property):
    run = Run(tmp_path, "eval")
    run.wait_for_a_request()
    code, seconds, _, stderr = run.signal(signal.SIGINT, signal.SIGINT)
    record_property("seconds_to_exit", round(seconds, 2))
    print(f"eval SIGINT twice: exit {code} after {seconds:.2f} s")
    assert code == 130 and "stopped at once" in stderr and "Traceback" not in stderr
