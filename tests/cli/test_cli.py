"""The persona-dspy command line, run in-process: eval and predict offline and over real HTTP, and its errors.

Nothing here writes to ~/.persona_dspy: PERSONA_DSPY_HOME points into tmp_path and memories are tmp folders or
':memory:'. Offline scores are plumbing checks of the stand-in, not a model's accuracy. Runs over HTTP that compare
the server's counts with the report's send no retries (``NO_RETRIES``): on a loaded machine a retry after a slow
answer would make the server answer more calls than the client made.
"""

from __future__ import annotations

import json
import socket

import pytest
from loopback_server import loopback_fixture

from persona_dspy.agent import semantic_memory
from persona_dspy.cli import main
from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
from persona_dspy.lm import config as lm_module

server = loopback_fixture()

LAMP3_USER = "A1L7M2JXN4EZCR"
LAMP3_QUERY = "300010"
NO_RETRIES = ("--retries", "0", "--timeout", "120")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No runner settings leak in, and the default home is a temporary folder."""
    for name in vars(lm_module):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(lm_module, name), raising=False)
    monkeypatch.delenv("PERSONA_DSPY_QDRANT_URL", raising=False)
    monkeypatch.delenv("PERSONA_DSPY_DENSE_MODEL", raising=False)
    monkeypatch.setenv("PERSONA_DSPY_HOME", str(tmp_path / "home"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- eval


def test_eval_offline_writes_a_json_report(capsys, tmp_path):
    out = tmp_path / "reports" / "lamp2n.json"
    args = ["eval", "--task", "LaMP_2N", "--lm", "offline", "--memory", str(tmp_path / "mem"), "--out", str(out),
            "--no-progress", "--workers", "3"]
    code, stdout, stderr = run(capsys, *args)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    histories = load_dataset(dataset_dir("LaMP_2N"))
    assert report["task"] == "LaMP_2N" and report["mode"] == "demos" and report["k"] == 5 and report["workers"] == 3
    assert report["offline"] is True and report["note"] == OFFLINE_NOTE and report["lm"]["model"] == "offline/stand-in"
    assert set(report["overall"]) == {"accuracy", "f1"} and len(report["per_user"]) == len(histories)
    assert report["calls"] == len(histories) + sum(len(h.queries) for h in histories)
    assert report["dataset"] == {"path": str(dataset_dir("LaMP_2N")), "split": "dev"}
    assert f"NOTE: {OFFLINE_NOTE}" in stdout and f"report: {out}" in stdout and "pooled" in stdout

    # ingestion is idempotent: a second run on the same memory folder gives the same answers
    code, _, stderr = run(capsys, *args)
    assert code == 0, stderr
    again = json.loads(out.read_text())
    assert again["predictions"] == report["predictions"] and again["overall"] == report["overall"]


def test_eval_default_report_path_is_under_the_home(capsys, tmp_path):
    code, stdout, stderr = run(capsys, "eval", "--task", "3", "--mode", "none", "--lm", "offline", "--no-progress")
    assert code == 0, stderr
    [path] = (tmp_path / "home" / "reports").glob("eval-LaMP_3-none-*.json")
    assert f"report: {path}" in stdout
    assert not (tmp_path / "home" / "memory").exists()  # the baseline reads no memory, so none was opened


def test_eval_over_http_records_the_model_and_server(capsys, tmp_path, server):
    server.reset()
    out = tmp_path / "http.json"
    code, stdout, stderr = run(capsys, "eval", "--task", "LaMP_3", "--lm", "openai/test-model", "--api-base",
                               server.api_base, "--memory", ":memory:", "--out", str(out), "--no-progress",
                               "--workers", "3", *NO_RETRIES)
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["lm"]["model"] == "openai/test-model" and report["lm"]["api_base"] == server.api_base
    assert report["lm"]["engine"] == "lm15" and report["offline"] is False and report["note"] is None
    assert "NOTE" not in stdout and "api_key" not in json.dumps(report["lm"])
    stats = server.stats()
    assert stats["answered"] == report["calls"] == 6 + 18  # one persona summary per user, one call per query
    assert report["tokens"]["unmetered_calls"] == 0 and report["tokens"]["completion_tokens"] > 0
    assert {r["model"] for r in stats["requests"]} == {"test-model"}
    assert set(report["overall"]) == {"mae", "rmse"} and report["failures"] == []


def test_eval_with_an_unreachable_server_is_an_error(capsys, tmp_path):
    base = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "dead.json"
    code, _, stderr = run(capsys, "eval", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", base, "--memory",
                          ":memory:", "--retries", "0", "--workers", "2", "--max-failures", "2", "--out", str(out),
                          "--no-progress")
    assert code == 2
    assert "persona-dspy: error: no user could be evaluated" in stderr and f"is the LM server at {base}" in stderr
    assert "Traceback" not in stderr
    report = json.loads(out.read_text())  # written anyway, for the record
    assert report["n_scored"] == 0 and report["failures"] and report["skipped_users"]


def test_eval_with_some_users_failing_exits_1(capsys, tmp_path, monkeypatch):
    histories = load_dataset(dataset_dir("LaMP_3"))
    bad = histories[2].user_id
    real = semantic_memory.initial_persona  # the default agent factory's persona, via initial_agent

    def flaky(history, *args, **kwargs):
        if history.user_id == bad:
            raise RuntimeError("summary failed")
        return real(history, *args, **kwargs)

    monkeypatch.setattr(semantic_memory, "initial_persona", flaky)
    out = tmp_path / "partial.json"
    code, stdout, stderr = run(capsys, "eval", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                               "--out", str(out), "--no-progress")
    assert code == 1
    assert "persona-dspy: warning: 1 user failed" in stderr and f"FAILED {bad} at persona" in stdout
    report = json.loads(out.read_text())
    assert [f["user_id"] for f in report["failures"]] == [bad] and bad not in report["per_user"]
    assert len(report["per_user"]) == len(histories) - 1


# --------------------------------------------------------------------------- predict


def test_predict_a_dataset_query_uses_its_own_profile(capsys):
    [history] = [h for h in load_dataset(dataset_dir("LaMP_3")) if h.user_id == LAMP3_USER]
    [query] = [q for q in history.queries if q.id == LAMP3_QUERY]
    code, stdout, stderr = run(capsys, "predict", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                               "--user", LAMP3_USER, "--query-id", LAMP3_QUERY)
    assert code == 0, stderr
    lines = stdout.splitlines()
    answer = next(line for line in lines if line.startswith("answer: ")).removeprefix("answer: ")
    assert answer in {"1", "2", "3", "4", "5"}
    assert any(line.startswith("raw answer: ") for line in lines) and f"gold: {query.gold}" in lines
    assert f"NOTE: {OFFLINE_NOTE}" in lines and "LM calls: 2" in stdout  # the persona summary, then the answer
    passages = [line for line in lines if line.startswith("  ") and "[item " in line]
    assert passages and len(passages) <= 5
    assert {line.rsplit("[item ", 1)[1].split(",")[0] for line in passages} <= query.profile_ids


def test_predict_free_text_searches_the_whole_memory(capsys, tmp_path):
    code, stdout, stderr = run(capsys, "predict", "--task", "LaMP_3", "--lm", "offline", "--memory",
                               str(tmp_path / "mem"), "--user", LAMP3_USER, "--text",
                               "Great product, works well and the battery lasts", "-k", "3")
    assert code == 0, stderr
    assert "query: free text (the user's whole memory)" in stdout and "gold:" not in stdout
    assert "answer: " in stdout and "retrieved passages (" in stdout


def test_predict_react_and_none(capsys):
    for mode in ("react", "none"):
        code, stdout, stderr = run(capsys, "predict", "--task", "LaMP_2N", "--lm", "offline", "--memory", ":memory:",
                                   "--user", "David Moye", "--query-id", "210050", "--mode", mode)
        assert code == 0, stderr
        assert f"mode: {mode}" in stdout and "answer: " in stdout


def test_predict_with_an_unreachable_server_is_an_error(capsys):
    base = f"http://127.0.0.1:{closed_port()}/v1"
    code, _, stderr = run(capsys, "predict", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", base, "--retries",
                          "0", "--memory", ":memory:", "--user", LAMP3_USER, "--text", "hello")
    assert code == 2 and stderr.startswith("persona-dspy: error: the LM call failed") and "Traceback" not in stderr


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--task", "LaMP_3", "--lm", "local/nonexistent.gguf"], "model file nonexistent.gguf does not exist"),
    (["eval", "--task", "LaMP_3", "--api-base", "http://127.0.0.1:9/v1"], "'local' starts its own server"),
    (["eval", "--task", "LaMP_9", "--lm", "offline"], "unknown task 'LaMP_9'"),
    (["eval", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", "localhost:8000/v1"], "malformed api_base"),
    (["eval", "--task", "LaMP_3", "--lm", "qwen"], "no provider prefix"),
    (["eval", "--task", "LaMP_3", "--lm", "offline", "--data", "/nonexistent/lamp"], "not a directory"),
    (["predict", "--task", "LaMP_3", "--lm", "offline", "--user", "nobody", "--text", "hi"],
     "unknown user(s): 'nobody'"),
    (["predict", "--task", "LaMP_3", "--lm", "offline", "--user", LAMP3_USER, "--query-id", "42"],
     f"user '{LAMP3_USER}' has no query '42'; their queries: 300010"),
    (["predict", "--task", "LaMP_3", "--lm", "offline", "--user", LAMP3_USER, "--text", "  "], "--text is empty"),
    (["ingest", "--data", "/tmp"], "--data needs a single --task"),
    # the data is read before any LM is built (a data error starts no model), then the LM flags are checked
    (["tune", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", "localhost:8000/v1", "--data", "/nonexistent"],
     "not a directory"),
    (["tune", "--task", "LaMP_3", "--lm", "openai/m", "--api-base", "localhost:8000/v1"], "malformed api_base"),
    (["tune", "--task", "LaMP_3", "--lm", "offline", "--optimizer-api-base", "http://127.0.0.1:9/v1"],
     "optimizer api_base (argument) was given without an optimizer model"),
    (["compile", "--task", "LaMP_3", "--lm", "offline", "--optimizer-api-base", "http://127.0.0.1:9/v1"],
     "without an optimizer model"),
])
def test_errors_exit_2_with_one_clear_line(capsys, argv, message):
    code, stdout, stderr = run(capsys, *argv, *(["--memory", ":memory:"] if argv[0] != "ingest" else []))
    assert code == 2
    assert stderr.startswith("persona-dspy: error: ") and message in stderr and "Traceback" not in stderr


def test_environment_names_the_lm_when_no_flag_does(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONA_DSPY_LM", "offline")
    out = tmp_path / "env.json"
    code, _, stderr = run(capsys, "eval", "--task", "LaMP_3", "--mode", "none", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert json.loads(out.read_text())["lm"]["model"] == "offline/stand-in"


@pytest.mark.parametrize("argv", [
    ["predict", "--task", "LaMP_3", "--lm", "offline", "--user", LAMP3_USER],  # neither --query-id nor --text
    ["predict", "--task", "LaMP_3", "--user", LAMP3_USER, "--query-id", "1", "--text", "x"],  # both
    ["eval", "--task", "LaMP_3", "--mode", "chat"],
    ["eval", "--task", "LaMP_3", "--workers", "0"],
    ["tune", "--task", "LaMP_3", "--lm", "offline", "--temperature", "0.7"],  # tune searches the temperature
])
def test_bad_flags_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- existing commands


def test_ingest_and_retrieval_eval_still_work(capsys, tmp_path):
    code, stdout, stderr = run(capsys, "ingest", "--task", "LaMP_3", "--memory", str(tmp_path / "mem"))
    assert code == 0, stderr
    assert "LaMP_3: 6 users" in stdout
    table = tmp_path / "quality.json"
    code, stdout, stderr = run(capsys, "retrieval-eval", "--task", "LaMP_3", "--memory", str(tmp_path / "mem"),
                               "--json", str(table))
    assert code == 0, stderr
    assert {row["strategy"] for row in json.loads(table.read_text())} >= {"recency", "majority", "bm25"}


# --------------------------------------------------------------------------- compile


def test_compile_offline_saves_programs_resumes_and_predict_uses_them(capsys, tmp_path):
    out = tmp_path / "programs"
    code, stdout, stderr = run(capsys, "compile", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                               "--out", str(out), "--no-progress", "--workers", "2")
    assert code == 0, stderr
    assert "compiled 6" in stdout and "NOTE" in stdout
    programs = sorted(p for p in out.glob("*.json") if p.name != "compile_summary.json")
    assert len(programs) == 6
    code, stdout, _ = run(capsys, "compile", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                          "--out", str(out), "--no-progress")
    assert code == 0 and "skipped (current) 6" in stdout
    mine = next(p for p in programs if p.name.startswith(LAMP3_USER))
    code, stdout, stderr = run(capsys, "predict", "--task", "LaMP_3", "--lm", "offline", "--user", LAMP3_USER,
                               "--query-id", LAMP3_QUERY, "--program", str(mine), "--memory", ":memory:")
    assert code == 0, stderr
    assert "answer:" in stdout
    other = next(p for p in programs if not p.name.startswith(LAMP3_USER))
    code, _, stderr = run(capsys, "predict", "--task", "LaMP_3", "--lm", "offline", "--user", LAMP3_USER,
                          "--text", "a tuner", "--program", str(other), "--memory", ":memory:")
    assert code == 2 and "belongs to user" in stderr


def test_compile_over_http_selected_users(capsys, tmp_path, server):
    server.reset()
    out = tmp_path / "programs"
    code, stdout, stderr = run(capsys, "compile", "--task", "LaMP_3", "--lm", "openai/test-model", "--api-base",
                               server.api_base, "--memory", ":memory:", "--out", str(out), "--no-progress",
                               "--users", LAMP3_USER, "--iterations", "1", *NO_RETRIES)
    assert code == 0, stderr
    assert "compiled 1" in stdout and "NOTE" not in stdout
    summary = json.loads((out / "compile_summary.json").read_text())
    assert summary["lm"]["model"] == "openai/test-model" and summary["lm_calls"] == server.stats()["answered"] > 0
    [program] = [p for p in out.glob("*.json") if p.name != "compile_summary.json"]
    assert json.loads(program.read_text())["metadata"]["lm"]["api_base"] == server.api_base


def test_compile_with_an_unreachable_server_fails_cleanly(capsys, tmp_path):
    code, _, stderr = run(capsys, "compile", "--task", "LaMP_3", "--lm", "openai/test-model", "--api-base",
                          f"http://127.0.0.1:{closed_port()}/v1", "--memory", ":memory:", "--out",
                          str(tmp_path / "p"), "--no-progress", "--retries", "0", "--timeout", "2")
    assert code == 2 and "no user could be compiled" in stderr


# --------------------------------------------------------------------------- tune


def test_tune_offline_runs_a_resumable_study(capsys, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = ["tune", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:", "--max-users", "2",
            "--storage", storage, "--max-calls-per-user", "60", "--out", str(tmp_path / "tune.json")]
    code, stdout, stderr = run(capsys, *argv, "--n-trials", "2")
    assert code == 0, stderr
    assert "2 trials done" in stdout and "best settings" in stdout and "NOTE" in stdout
    code, stdout, _ = run(capsys, *argv, "--n-trials", "3")
    assert code == 0 and "3 trials done" in stdout
    summary = json.loads((tmp_path / "tune.json").read_text())
    assert summary["trials_done"] == 3 and set(summary["best_settings"]) >= {"batch_size", "iterations", "k"}
    code, _, stderr = run(capsys, "tune", "--task", "LaMP_3", "--memory", ":memory:", "--api-base", "http://h:1/v1")
    assert code == 2 and "starts its own server" in stderr  # no --lm: the embedded model, which takes no api_base


# --------------------------------------------------------------------------- compare


def test_compare_offline_writes_json_and_csv(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, stderr = run(capsys, "compare", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                               "--max-users", "1", "--optimizers", "initial", "persona_aligner", "copro", "--out",
                               str(out),
                               "--no-progress")
    assert code == 0, stderr
    assert "persona_aligner" in stdout and "copro" in stdout
    report = json.loads((out / "comparison.json").read_text())
    results = {row["name"]: row for row in report["results"]}
    assert set(results) == {"initial", "persona_aligner", "copro"}
    assert results["persona_aligner"]["compile_calls_per_user"] == 24 and results["initial"]["compile_calls"] == 0
    assert (out / "comparison.csv").read_text().startswith("optimizer")


def test_an_app_loads_a_compiled_program_and_finds_the_users_memory(capsys, tmp_path):
    import dspy

    from persona_dspy.memory.episodic import EpisodicMemory
    from persona_dspy.programs import load_program
    from persona_dspy.testing.offline_lm import offline_lm

    store, out = tmp_path / "memory", tmp_path / "programs"
    code, _, stderr = run(capsys, "compile", "--task", "LaMP_3", "--lm", "offline", "--memory", str(store),
                          "--out", str(out), "--no-progress", "--users", LAMP3_USER)
    assert code == 0, stderr
    [path] = [p for p in out.glob("*.json") if p.name != "compile_summary.json"]
    with EpisodicMemory.for_task("LaMP_3", store) as memory, dspy.context(lm=offline_lm()):
        agent = load_program(path, memory, user_id=LAMP3_USER, task="LaMP_3")
        prediction = agent(query="What is the score of the following review? review: the strings sound great")
    user_items = {it.id for h in load_dataset(dataset_dir("LaMP_3")) if h.user_id == LAMP3_USER for it in h.items}
    assert prediction.passages and {p.item_id for p in prediction.passages} <= user_items
    assert prediction.answer in {"1", "2", "3", "4", "5"}


def test_compare_and_tune_over_http(capsys, tmp_path, server):
    server.reset()
    http = ["--lm", "openai/test-model", "--api-base", server.api_base, "--memory", ":memory:", *NO_RETRIES]
    code, stdout, stderr = run(capsys, "compare", "--task", "LaMP_3", *http, "--max-users", "1", "--optimizers",
                               "initial", "persona_aligner", "--out", str(tmp_path / "cmp"), "--no-progress")
    assert code == 0, stderr
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert report["offline"] is False and report["lm"]["api_base"] == server.api_base
    compared = server.stats()["answered"]
    assert compared == sum(r["compile_calls"] + r["eval_calls"] for r in report["results"]) + 1  # + the persona
    code, stdout, stderr = run(capsys, "tune", "--task", "LaMP_3", *http, "--max-users", "1", "--n-trials", "1",
                               "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out", str(tmp_path / "t.json"))
    assert code == 0, stderr
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["trials_done"] == 1 and summary["offline"] is False
    assert server.stats()["answered"] > compared


def test_user_selection_means_the_same_in_every_command(capsys, tmp_path):
    out = tmp_path / "cmp"
    code, _, stderr = run(capsys, "compare", "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                          "--users", LAMP3_USER, "--optimizers", "initial", "--out", str(out), "--no-progress")
    assert code == 0, stderr
    assert json.loads((out / "comparison.json").read_text())["user_ids"] == [LAMP3_USER]
    for command in ("compile", "compare", "tune"):
        code, _, stderr = run(capsys, command, "--task", "LaMP_3", "--lm", "offline", "--memory", ":memory:",
                              "--users", "nobody", "--out", str(tmp_path / command))
        assert code == 2 and "unknown user(s): 'nobody'" in stderr, (command, stderr)


def test_embedded_server_flags_reach_its_settings():
    from persona_dspy.cli import build_parser, server_options

    args = build_parser().parse_args(["eval", "--task", "LaMP_2N", "--workers", "3", "--server-threads", "2",
                                      "--no-prompt-cache"])
    assert server_options(args) == {"threads": 2, "prompt_cache": False}  # slots: the server's default, not workers
    sized = build_parser().parse_args(["eval", "--task", "LaMP_2N", "--server-slots", "2", "--server-context", "2048",
                                       "--server-cache-mib", "0"])
    assert server_options(sized) == {"slots": 2, "context_per_slot": 2048, "cache_ram_mib": 0}
    defaults = build_parser().parse_args(["eval", "--task", "LaMP_2N"])
    assert "prompt_cache" not in server_options(defaults)  # the server's own default (on) stays
