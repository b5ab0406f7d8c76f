"""The README runs as written: every command line and Python block, in order, in one fresh home folder.

The LM is the offline stand-in (PERSONA_DSPY_LM=offline) wherever the README relies on the default, and the
scripted OpenAI-compatible server (tests/loopback_server.py) wherever it names a server on localhost. Lines that
cannot run here are listed in SKIPPED with the reason; any other line must run and exit 0, so the README cannot
drift from the code again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from loopback_server import loopback_fixture

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
server = loopback_fixture()

SKIPPED = {
    "python3 -m venv": "creates a venv: the suite runs inside such an install",
    "pip install": "installs the package: the suite runs inside such an install",
    "vllm serve": "starts an external GPU server; the persona-dspy line after it runs against the scripted server",
    "ollama pull": "fetches a model into an external Ollama server",
    "llama-server": "starts an external llama.cpp server; the persona-dspy line after it runs against the scripted "
                    "server",
    "persona-dspy models fetch": "downloads the model; the suite runs offline (the real-model tests skip without it)",
    "python -m pytest": "runs this very suite",
    "persona-dspy eval --task LaMP_2N --lm ollama_chat/": "speaks Ollama's own API, which the scripted server (an "
                                                          "OpenAI-compatible one) does not",
    "persona-dspy compile --task LaMP_3 --lm Qwen/Qwen2.5-7B-Instruct --api-base http://gpu1": "names GPU servers and "
    "a running Ray cluster this machine does not have; the --ray line before it runs on a local cluster",
}
LOCAL_SERVER = re.compile(r"http://localhost:\d+(/v1)?")


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in document order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M)


def section_of(text: str, body: str) -> str:
    """The "## " heading a block's body stands under."""
    headings = re.findall(r"^## .*$", text[: text.index(body)], flags=re.M)
    return headings[-1] if headings else ""


def commands(body: str) -> list[str]:
    """The shell commands of a bash block: one per line, `a && b` split, comments dropped."""
    found = []
    for line in body.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            found += [part.strip() for part in line.split(" && ")]
    return found


def skip_reason(command: str) -> str | None:
    bare = command.removeprefix(".venv/bin/")
    return next((why for prefix, why in SKIPPED.items() if bare.startswith(prefix)), None)


def test_readme_has_the_blocks_the_user_needs():
    found = blocks(README.read_text())
    assert {lang for lang, _ in found} == {"bash", "python"}
    python = "\n".join(body for lang, body in found if lang == "python")
    assert "find_program(" in python and "load_program(" in python and "build_lm(" in python
    lines = [c for lang, body in found if lang == "bash" for c in commands(body)]
    for command in ("users", "memory delete", "memory rebuild", "--settings", "--vs-initial", "--version"):
        assert any(command in line for line in lines), command


def test_every_readme_command_and_python_block_runs_as_written(tmp_path, server):
    env = {**os.environ, "PERSONA_DSPY_HOME": str(tmp_path / "home"), "PERSONA_DSPY_LM": "offline",
           "PERSONA_DSPY_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name in ("PERSONA_DSPY_API_BASE", "PERSONA_DSPY_OPTIMIZER_LM", "PERSONA_DSPY_DENSE_MODEL",
                 "PERSONA_DSPY_QDRANT_URL"):
        env.pop(name, None)
    work = tmp_path / "cwd"
    work.mkdir()
    ran, skipped = [], []
    text = README.read_text()
    sections = [section_of(text, body) for _, body in blocks(text)]
    earlier: dict[str, str] = {}  # the Python blocks so far of each section: a later block continues them
    for n, (lang, body) in enumerate(blocks(text)):
        if lang == "python":
            code = earlier[sections[n]] = earlier.get(sections[n], "") + body
            script = work / f"readme_block_{n}.py"
            script.write_text(code)
            result = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                                    text=True, timeout=600)
            # dspy's optimizers log and draw progress on stderr; nothing there may be an error (at exit included)
            problems = [line for line in result.stderr.splitlines() if re.search(r"Traceback|Error|Exception", line)]
            assert result.returncode == 0 and not problems, f"python block {n}:\n{body}\n{result.stderr}"
            ran.append(f"python block {n}")
            continue
        for command in commands(body):
            if (why := skip_reason(command)) is not None:
                skipped.append((command, why))
                continue
            argv = shlex.split(LOCAL_SERVER.sub(server.api_base, command))
            assert argv[0].removeprefix(".venv/bin/") == "persona-dspy", f"README line not run, not skipped: {command}"
            server.reset()
            result = subprocess.run([sys.executable, "-m", "persona_dspy.cli", *argv[1:]], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=600)  # stderr is no terminal: no bars
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
            ran.append(command)
    assert len(ran) >= 15 and {why for _, why in skipped} <= set(SKIPPED.values())
