"""README.md and the docs pages run as written: every command line and Python block, page by page.

Each page runs in order in one fresh home folder; a page's Python blocks build on each other like a notebook's cells
(a block runs with the page's earlier blocks before it). The LM is the offline stand-in (PERSONA_DSPY_LM=offline)
wherever a page relies on the default, and the scripted OpenAI-compatible server (tests/loopback_server.py) wherever
it names a server on localhost. What cannot run here is skipped by one of two explicit rules, and reported:
command lines whose start is listed in SKIPPED, and blocks marked in the page with ``<!-- not run: reason -->`` on
the line before them (each such block is a skipped test of its own, with its reason). Any other line must run and
exit 0, so the pages cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from loopback_server import loopback_fixture

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
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
BLOCK = re.compile(r"^(?:<!-- not run: ([^\n]*?) -->\n)?```(\w+)\n(.*?)^```", flags=re.S | re.M)


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, reason it is not run or None) of every fenced block, in document order."""
    return [(m.group(2), m.group(3), m.group(1)) for m in BLOCK.finditer(text)]


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


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


NOT_RUN = [(page_id(page), n, reason) for page in PAGES for n, (_, _, reason) in enumerate(blocks(page.read_text()))
           if reason is not None]


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    lang, first, _ = blocks(text)[0]
    assert lang == "bash" and len(first.splitlines()) == 2
    main_job, tests = first.splitlines()
    assert main_job.endswith("persona-dspy compile --task LaMP_3") and tests.endswith("python -m pytest -q")
    assert tests.split(" && ")[-1] in (REPO / ".ci" / "run").read_text()  # .ci/run runs the README's test command
    python = [body for lang, body, _ in blocks(text) if lang == "python"]
    aligner = next(body for body in python if "PersonaAligner(" in body)
    assert len([line for line in aligner.splitlines() if line.strip()]) <= 12
    imports = [line for line in aligner.splitlines() if line.startswith(("import ", "from "))]
    assert all(line == "import dspy" or line.startswith("from persona_dspy import ") for line in imports), imports
    assert any("load_program(" in body and "find_program(" in body and "build_lm(" in body for body in python)
    assert text.count("<!-- personalization:start -->") == text.count("<!-- personalization:end -->") == 1


def test_the_pages_hold_the_commands_the_user_needs():
    lines = [c for page in PAGES for lang, body, _ in blocks(page.read_text()) if lang == "bash"
             for c in commands(body)]
    for command in ("users", "memory delete", "memory rebuild", "--settings", "--vs-initial", "--version", "--ray",
                    "compare", "tune"):
        assert any(command in line for line in lines), command


@pytest.mark.parametrize("page, n, reason", NOT_RUN, ids=[f"{p}-block{n}" for p, n, _ in NOT_RUN])
def test_block_marked_not_run(page, n, reason):
    assert reason.strip(), f"{page} block {n}: a block marked not run must say why"
    pytest.skip(f"{page} block {n} not run: {reason}")


@pytest.mark.parametrize("page", [page for page in PAGES if blocks(page.read_text())], ids=page_id)
def test_every_command_and_python_block_runs_as_written(page, tmp_path, server):
    env = {**os.environ, "PERSONA_DSPY_HOME": str(tmp_path / "home"), "PERSONA_DSPY_LM": "offline",
           "PERSONA_DSPY_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name in ("PERSONA_DSPY_API_BASE", "PERSONA_DSPY_OPTIMIZER_LM", "PERSONA_DSPY_DENSE_MODEL",
                 "PERSONA_DSPY_QDRANT_URL", "PERSONA_DSPY_MODELS"):
        env.pop(name, None)
    work = tmp_path / "cwd"
    work.mkdir()
    ran, skipped = [], []
    code = ""  # the page's Python blocks so far: a later block continues them
    for n, (lang, body, not_run) in enumerate(blocks(page.read_text())):
        if not_run is not None:
            skipped.append((f"block {n}", not_run))
            continue
        if lang == "python":
            code += body
            script = work / f"block_{n}.py"
            script.write_text(code)
            result = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                                    text=True, timeout=600)
            # dspy's optimizers log and draw progress on stderr; nothing there may be an error (at exit included)
            problems = [line for line in result.stderr.splitlines() if re.search(r"Traceback|Error|Exception", line)]
            assert result.returncode == 0 and not problems, f"python block {n}:\n{body}\n{result.stderr}"
            ran.append(f"python block {n}")
            continue
        assert lang == "bash", f"{page_id(page)} block {n}: only bash and python blocks run; mark it not run"
        for command in commands(body):
            if (why := skip_reason(command)) is not None:
                skipped.append((command, why))
                continue
            argv = shlex.split(LOCAL_SERVER.sub(server.api_base, command))
            assert argv[0].removeprefix(".venv/bin/") == "persona-dspy", f"line not run, not skipped: {command}"
            server.reset()
            result = subprocess.run([sys.executable, "-m", "persona_dspy.cli", *argv[1:]], cwd=work, env=env,
                                    capture_output=True, text=True, timeout=600)  # stderr is no terminal: no bars
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
            ran.append(command)
    assert {why for what, why in skipped if not what.startswith("block ")} <= set(SKIPPED.values())
