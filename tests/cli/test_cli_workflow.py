"""A user's path through the command line after the first command: compiled programs used by eval and predict,
``users`` and ``memory``, tune settings into compile, merged compile summaries, and the flags every command shares.

Offline stand-in LM throughout (a plumbing check, not a model); PERSONA_DSPY_HOME is a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import isolated  # noqa: F401  (autouse: no runner LM settings, PERSONA_DSPY_HOME in tmp_path)

from persona_dspy.cli import build_parser, main
from persona_dspy.console import plural, show_progress
from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.programs import default_programs_dir, find_program, program_path, read_program_metadata

REPO = Path(__file__).resolve().parents[2]
USERS = [h.user_id for h in load_dataset(dataset_dir("LaMP_3"))]
OFFLINE = ["--task", "LaMP_3", "--lm", "offline", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- start-up

HEAVY = ("dspy", "litellm", "qdrant_client", "fastembed", "xllamacpp", "optuna")
FAST_PATHS = [
    ["--help"], ["--version"], ["eval", "--help"], ["compile", "--help"],
    ["eval", "--task", "LaMP_9", "--lm", "offline"],                                # unknown task
    ["eval", "--task", "LaMP_3", "--lm", "offline", "--data", "/nonexistent/lamp"],  # data-file error
    ["eval", "--task", "LaMP_3", "--workers", "0"],                                 # a bad number
    ["compile", "--task", "LaMP_3", "--users", "nobody"],                           # an unknown user
    ["predict", "--task", "LaMP_3", "--user", USERS[0], "--query-id", "42"],        # an unknown query
    ["users", "--task", "LaMP_3", "--users", "nobody"],
    ["eval", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", "localhost:8000/v1"],  # a malformed LM setting
]


def test_help_version_and_argument_or_data_errors_import_nothing_heavy():
    script = (
        "import sys, time, json\n"
        "from persona_dspy.cli import main\n"
        f"heavy = {HEAVY!r}\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    t = time.perf_counter()\n"
        "    try:\n"
        "        code = main(argv)\n"
        "    except SystemExit as exc:\n"
        "        code = exc.code\n"
        "    loaded = [m for m in heavy if m in sys.modules]\n"
        "    print('RESULT', json.dumps([argv, code, loaded, time.perf_counter() - t]), flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, json.dumps(FAST_PATHS)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    rows = [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == len(FAST_PATHS), result.stderr[-2000:]
    for argv, code, loaded, _ in rows:
        assert code in (0, 2), (argv, code)
        assert loaded == [], f"{argv} imported {loaded}"
    assert "--version" in " ".join(" ".join(r[0]) for r in rows) and "persona-dspy 0." in result.stdout


@pytest.mark.parametrize("argv", [
    ["-v", "users", "--task", "LaMP_3"], ["users", "--task", "LaMP_3", "-v"],
])
def test_verbosity_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose == 1


def test_quiet_before_or_after_and_one_does_not_undo_the_other():
    assert build_parser().parse_args(["-q", "ingest"]).quiet is True
    assert build_parser().parse_args(["ingest", "-q"]).quiet is True
    args = build_parser().parse_args(["-vv", "ingest"])
    assert args.verbose == 2 and args.quiet is False


PER_USER_COMMANDS = {
    "ingest": ["--task", "LaMP_3"], "retrieval-eval": ["--task", "LaMP_3"], "eval": ["--task", "LaMP_3"],
    "compile": ["--task", "LaMP_3"], "compare": ["--task", "LaMP_3"], "tune": ["--task", "LaMP_3"],
    "users": ["--task", "LaMP_3"], "memory": ["rebuild", "--task", "LaMP_3"],
}


@pytest.mark.parametrize("command", sorted(PER_USER_COMMANDS))
def test_every_per_user_command_selects_users_the_same_way(command):
    args = build_parser().parse_args([command, *PER_USER_COMMANDS[command], "--users", "a", "b", "--max-users", "2"])
    assert args.users == ["a", "b"] and args.max_users == 2
    if command != "users":  # every command that can take long shows progress by the same rule
        assert build_parser().parse_args([command, *PER_USER_COMMANDS[command], "--progress"]).progress is True
        assert build_parser().parse_args([command, *PER_USER_COMMANDS[command], "--no-progress"]).progress is False
        assert build_parser().parse_args([command, *PER_USER_COMMANDS[command]]).progress is None


def test_progress_rule_is_terminal_only_unless_asked(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(None) is True and show_progress(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert show_progress(None) is False and show_progress(True) is True


@pytest.mark.parametrize("argv", [
    ["retrieval-eval", "-k", "0"], ["eval", "--task", "LaMP_3", "--temperature", "-1"],
    ["compile", "--task", "LaMP_3", "--max-users", "0"], ["eval", "--task", "LaMP_3", "--max-users", "x"],
    ["users", "--task", "LaMP_3", "--recent", "0"], ["compile", "--task", "LaMP_3", "--iterations", "-1"],
])
def test_numbers_are_checked_when_the_arguments_are_parsed(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_counts_read_as_english():
    assert plural(1, "user") == "1 user" and plural(2, "user") == "2 users" and plural(0, "user") == "0 users"


# --------------------------------------------------------------------------- compiled programs everywhere


def test_eval_and_predict_use_each_users_compiled_program(capsys, tmp_path):
    code, stdout, stderr = run(capsys, "compile", *OFFLINE, "--max-users", "1", "--memory", str(tmp_path / "m"))
    assert code == 0, stderr
    assert "LaMP_3: 1 user ->" in stdout and "with 4 workers" in stdout  # no "1 users"
    code, stdout, stderr = run(capsys, "compile", *OFFLINE, "--users", USERS[1], "--memory", str(tmp_path / "m"))
    assert code == 0, stderr
    compiled = {USERS[0], USERS[1]}
    assert {u for u in USERS if find_program("LaMP_3", u)} == compiled
    assert find_program("LaMP_3", USERS[0]) == program_path(default_programs_dir("LaMP_3"), USERS[0])

    out = tmp_path / "eval.json"
    code, stdout, stderr = run(capsys, "eval", *OFFLINE, "--memory", str(tmp_path / "m"), "--out", str(out),
                               "--vs-initial")
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert {u for u, source in report["agents"].items() if source != "initial"} == compiled
    assert all(Path(report["agents"][u]).is_file() for u in compiled)
    assert "answering with: 2 compiled programs" in stdout and "answered by: 2 compiled programs, 4 initial" in stdout
    assert set(report["vs_initial"]["per_user"]) == set(report["per_user"]) == set(USERS)
    assert "initial persona vs this run" in stdout
    # compiled users need no persona summary: 4 summaries (initial users) + 18 answers, then 6 + 18 for the baseline
    assert report["calls"] == 4 + 18 and report["vs_initial"]["calls"] == 6 + 18

    code, stdout, stderr = run(capsys, "eval", *OFFLINE, "--memory", str(tmp_path / "m"), "--out", str(out),
                               "--initial")
    assert code == 0, stderr
    assert set(json.loads(out.read_text())["agents"].values()) == {"initial"}
    code, _, stderr = run(capsys, "eval", *OFFLINE, "--memory", str(tmp_path / "m"), "--out", str(out),
                          "--programs", str(tmp_path / "elsewhere"))
    assert code == 0 and set(json.loads(out.read_text())["agents"].values()) == {"initial"}

    predict = ["predict", "--task", "LaMP_3", "--lm", "offline", "--memory", str(tmp_path / "m"), "--user",
               USERS[0], "--query-id", str(load_dataset(dataset_dir("LaMP_3"))[0].queries[0].id)]
    code, stdout, stderr = run(capsys, *predict)
    assert code == 0, stderr
    assert f"program: {find_program('LaMP_3', USERS[0])} (compiled " in stdout and "LM calls: 1" in stdout
    code, stdout, _ = run(capsys, *predict, "--initial")
    assert "program: none: the initial persona (--initial)" in stdout and "LM calls: 2" in stdout
    code, stdout, _ = run(capsys, *predict, "--mode", "react")
    assert "is a demos program, --mode is react" in stdout


def test_compile_summary_keeps_earlier_runs_users(capsys, tmp_path):
    out = tmp_path / "programs"
    for user in USERS[:2]:
        code, _, stderr = run(capsys, "compile", *OFFLINE, "--memory", ":memory:", "--out", str(out), "--users", user)
        assert code == 0, stderr
    code, _, stderr = run(capsys, "compile", *OFFLINE, "--memory", ":memory:", "--out", str(out), "--users",
                          USERS[0])
    summary = json.loads((out / "compile_summary.json").read_text())
    assert [r["user_id"] for r in summary["results"]] == [USERS[0]] and summary["results"][0]["status"] == "skipped"
    assert set(summary["users"]) == set(USERS[:2])
    assert {entry["status"] for entry in summary["users"].values()} == {"compiled"}  # skipped keeps the real entry


def test_tune_best_settings_feed_compile(capsys, tmp_path):
    best = tmp_path / "best.json"
    code, stdout, stderr = run(capsys, "tune", *OFFLINE, "--memory", ":memory:", "--max-users", "1",
                               "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(best))
    assert code == 0, stderr
    assert f"--settings {best}" in stdout
    settings = json.loads(best.read_text())["best_settings"]
    out = tmp_path / "programs"
    code, _, stderr = run(capsys, "compile", *OFFLINE, "--memory", ":memory:", "--max-users", "1", "--out", str(out),
                          "--settings", str(best))
    assert code == 0, stderr
    saved = json.loads((out / "compile_summary.json").read_text())["settings"]
    assert {key: saved[key] for key in ("batch_size", "iterations", "k")} == {
        key: settings[key] for key in ("batch_size", "iterations", "k")}
    [program] = [p for p in out.glob("*.json") if p.name != "compile_summary.json"]
    assert read_program_metadata(program)["lm"]["temperature"] == pytest.approx(settings["temperature"])

    flat = tmp_path / "flat.json"  # a hand-written file; a flag on the command line wins over it
    flat.write_text(json.dumps({"iterations": 2, "batch_size": 1}))
    code, _, stderr = run(capsys, "compile", *OFFLINE, "--memory", ":memory:", "--max-users", "1", "--out",
                          str(tmp_path / "p2"), "--settings", str(flat), "--iterations", "1")
    assert code == 0, stderr
    saved = json.loads((tmp_path / "p2" / "compile_summary.json").read_text())["settings"]
    assert saved["iterations"] == 1 and saved["batch_size"] == 1

    flat.write_text(json.dumps({"iterations": 2, "learning_rate": 1}))
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", *OFFLINE, "--settings", str(flat)])
    assert exit_info.value.code == 2 and "unknown setting(s) learning_rate" in capsys.readouterr().err


# --------------------------------------------------------------------------- users and memory


def test_users_lists_counts_memory_and_programs(capsys, tmp_path):
    memory = str(tmp_path / "mem")
    code, stdout, stderr = run(capsys, "users", "--task", "LaMP_3", "--memory", memory, "--json")
    assert code == 0, stderr
    listing = json.loads(stdout)
    histories = load_dataset(dataset_dir("LaMP_3"))
    assert [row["user"] for row in listing["users"]] == USERS and listing["memory"] is None
    assert not Path(memory).exists()  # looking created nothing
    first = listing["users"][0]
    assert (first["history"], first["queries"], first["recent"]) == (len(histories[0].items),
                                                                     len(histories[0].queries), 3)
    assert first["memory"] == "not ingested" and first["program"] is None

    code, _, stderr = run(capsys, "compile", *OFFLINE, "--memory", memory, "--users", USERS[0])
    assert code == 0, stderr
    code, stdout, _ = run(capsys, "users", "--task", "LaMP_3", "--memory", memory, "--json")
    listing = json.loads(stdout)
    row = {r["user"]: r for r in listing["users"]}[USERS[0]]
    assert row["memory"] == "complete" and row["memory_items"] == len(histories[0].items)
    program = row["program"]
    assert program["path"] == str(find_program("LaMP_3", USERS[0])) and program["lm"] == "offline/stand-in"
    assert program["persona_words"] > 10 and program["aligned"] and isinstance(program["dev_score"], float)
    code, stdout, _ = run(capsys, "users", "--task", "LaMP_3", "--memory", memory)
    assert code == 0 and "6 users" in stdout and "persona words" in stdout and Path(program["path"]).name in stdout


def test_memory_delete_and_rebuild_need_yes(capsys, tmp_path):
    memory = str(tmp_path / "mem")
    code, _, stderr = run(capsys, "memory", "delete", "--task", "LaMP_3", "--memory", memory, "--user", USERS[0])
    assert code == 2 and "no LaMP_3 memory" in stderr
    assert run(capsys, "ingest", "--task", "LaMP_3", "--memory", memory)[0] == 0

    def stored() -> dict[str, int]:
        return {row["user"]: row["memory_items"] for row in json.loads(
            run(capsys, "users", "--task", "LaMP_3", "--memory", memory, "--json")[1])["users"]}

    before = stored()
    code, _, stderr = run(capsys, "memory", "delete", "--task", "LaMP_3", "--memory", memory, "--user", USERS[0])
    assert code == 2 and "add --yes" in stderr and stored() == before  # nothing changed without --yes
    code, stdout, stderr = run(capsys, "memory", "delete", "--task", "LaMP_3", "--memory", memory, "--user",
                               USERS[0], "--yes")
    assert code == 0, stderr
    assert "deleted: 1 user" in stdout and stored() == {**before, USERS[0]: 0}
    code, stdout, stderr = run(capsys, "memory", "rebuild", "--task", "LaMP_3", "--memory", memory, "--yes")
    assert code == 0, stderr
    assert "rebuilt: 6 users" in stdout and stored() == before


def test_a_memory_left_open_closes_quietly_at_exit(tmp_path):
    """Qdrant's own __del__ would close it after imports stopped working: an ImportError traceback at exit."""
    script = ("from persona_dspy.memory import EpisodicMemory\n"
              f"memory = EpisodicMemory.for_task('LaMP_3', {str(tmp_path / 'mem')!r})\n"
              "print(memory.count())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "0" and result.stderr.strip() == "", result.stderr
