"""A weak model over real HTTP: the scripted server echoes its prompt, writes placeholders, truncates, overflows its
context and writes junk tool steps (``loopback_server`` reply modes). Nothing it writes may become a saved persona or
a scored label, every command says so in words, and the counts in every report add up with the server's own.

Runs that compare the server's counts with the report's send no retries: a retry after a slow answer would make the
server answer more calls than the client made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loopback_server import loopback_fixture

from persona_dspy.cli import main
from persona_dspy.lm import budget
from persona_dspy.lm import config as lm_module
from persona_dspy.outputs.validation import STEPS

server = loopback_fixture()
NO_RETRIES = ("--retries", "0", "--timeout", "120")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, server):
    for name in vars(lm_module):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(lm_module, name), raising=False)
    monkeypatch.setenv("PERSONA_DSPY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(budget, "_windows", {})  # each test's server script decides the context size
    monkeypatch.setattr(budget, "_declared", {})
    server.reset()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lm_args(server) -> tuple[str, ...]:
    return ("--lm", "openai/test-model", "--api-base", server.api_base, "--memory", ":memory:", "--no-progress",
            *NO_RETRIES)


def assert_counts_add_up(per_user: dict[str, dict], totals: dict, server_stats: dict) -> None:
    """Per-user counts sum to the totals, the totals match what the server saw, rejected never exceeds checked."""
    assert totals["lm_calls"] == sum(u["lm_calls"] for u in per_user.values()) == server_stats["chat_requests"]
    assert totals["truncations"] == sum(u["truncations"] for u in per_user.values()) == server_stats["truncated"]
    for kind in ("checked", "invalid", "retries", "fallbacks"):
        for step in STEPS:
            assert totals[kind][step] == sum(u[kind][step] for u in per_user.values()), (kind, step)
    for step in STEPS:
        assert totals["invalid"][step] <= totals["checked"][step]
        assert totals["retries"][step] <= totals["invalid"][step]


def test_compile_against_an_echoing_model_saves_nothing_and_keeps_the_previous_program(capsys, tmp_path, server):
    out = tmp_path / "programs"
    code, _, _ = run(capsys, "compile", "--task", "LaMP_3", "--max-users", "2", "--out", str(out), *lm_args(server))
    assert code == 0  # a working model first: both users get a program
    before = {p.name: p.read_bytes() for p in out.glob("*-*.json")}
    assert len(before) == 2

    server.reset(reply_mode="echo")
    code, stdout, stderr = run(capsys, "compile", "--task", "LaMP_3", "--max-users", "2", "--out", str(out),
                               "--force", *lm_args(server))
    assert code == 2 and "no user could be compiled" in stderr and "Traceback" not in stderr
    # the summaries were rejected (their answers were stated instead), and every answer it was scored on was invalid
    assert "not saved: all " in stderr and "answers it was scored on were invalid" in stderr
    assert "the previous program file is kept" in stderr
    assert {p.name: p.read_bytes() for p in out.glob("*-*.json")} == before  # untouched, no version added
    assert "most of the model's outputs were invalid" in stdout
    summary = json.loads((out / "compile_summary.json").read_text())
    results = [r for r in summary["results"]]
    assert [r["status"] for r in results] == ["failed", "failed"]
    totals = summary["output_totals"]
    assert_counts_add_up({r["user_id"]: r["outputs"] for r in results}, totals, server.stats())
    assert totals["invalid"]["summary"] == 4 and totals["retries"]["summary"] == 2  # asked twice per user
    assert totals["invalid"]["answer"] == totals["checked"]["answer"] == 6  # 3 recent interactions per user
    # feedback on the oldest of the 3 recent interactions (the newer 2 are held back), asked twice, per iteration
    assert totals["invalid"]["loss"] == 4 and totals["retries"]["loss"] == 2 and totals["checked"]["update"] == 0


def test_eval_against_an_echoing_model_scores_every_answer_invalid(capsys, tmp_path, server):
    server.reset(reply_mode="echo")
    report_path = tmp_path / "eval.json"
    code, stdout, stderr = run(capsys, "eval", "--task", "LaMP_3", "--max-users", "2", "--initial", "--out",
                               str(report_path), *lm_args(server))
    assert code == 0 and "Traceback" not in stderr  # without --strict: a warning in words, not a failure
    assert "6 of them invalid answers" in stdout and "WARNING: most of the model's outputs were invalid" in stdout
    report = json.loads(report_path.read_text())
    assert report["n_scored"] == 6 and all(p["invalid"] and p["prediction"] == "" for p in report["predictions"])
    assert all(p["raw_answer"] == "{query}" for p in report["predictions"])  # kept for the record, never mapped
    totals = report["output_totals"]
    assert totals["invalid"]["answer"] == totals["checked"]["answer"] == 6
    assert_counts_add_up(report["outputs"], totals, server.stats())
    assert totals["lm_calls"] == report["calls"]

    server.reset(reply_mode="echo")
    code, _, stderr = run(capsys, "eval", "--task", "LaMP_3", "--max-users", "2", "--initial", "--strict", "--out",
                          str(tmp_path / "strict.json"), *lm_args(server))
    assert code == 2 and "persona-dspy: error: --strict: most of the model's outputs were invalid" in stderr


def test_placeholders_never_become_a_persona(capsys, tmp_path, server):
    from persona_dspy.programs import read_program_metadata

    server.reset(reply_mode="placeholder")
    out = tmp_path / "programs"
    code, stdout, stderr = run(capsys, "compile", "--task", "LaMP_3", "--max-users", "1", "--out", str(out),
                               *lm_args(server))
    assert "a structured object, not text" in stderr and "most of the model's outputs were invalid" in stdout
    summary = json.loads((out / "compile_summary.json").read_text())
    totals = summary["output_totals"]
    assert totals["invalid"]["answer"] == 0  # the schema forces a label: those are valid answers
    assert totals["invalid"]["loss"] == totals["checked"]["loss"] > 0
    assert totals["invalid"]["summary"] == 2 and totals["fallbacks"]["summary"] >= 1
    assert_counts_add_up({r["user_id"]: r["outputs"] for r in summary["results"]}, totals, server.stats())
    # The summary was a placeholder twice: the saved persona states the user's own most frequent ratings instead,
    # and no placeholder or object reached it. The valid answers were scored on it, so the program is kept.
    assert code == 0
    (program,) = out.glob("*-*.json")
    persona = read_program_metadata(program)["persona"]
    assert "- Ratings of their " in persona and "{" not in persona


def test_truncated_replies_are_counted(capsys, tmp_path, server):
    server.reset(reply_mode="truncate")
    report_path = tmp_path / "eval.json"
    run(capsys, "eval", "--task", "LaMP_2N", "--max-users", "1", "--initial", "--out", str(report_path),
        *lm_args(server))
    report = json.loads(report_path.read_text())
    stats = server.stats()
    assert report["output_totals"]["truncations"] == stats["truncated"] == stats["chat_requests"] > 0
    assert_counts_add_up(report["outputs"], report["output_totals"], stats)


def test_prompts_are_fitted_to_the_context_the_server_reports(capsys, tmp_path, server):
    server.reset(n_ctx=1800)  # /props says 1,800 tokens: the retrieved reviews must shrink to fit
    report_path = tmp_path / "eval.json"
    code, _, stderr = run(capsys, "eval", "--task", "LaMP_3", "--max-users", "2", "--initial", "--out",
                          str(report_path), *lm_args(server))
    assert code == 0, stderr
    stats = server.stats()
    assert stats["overflowed"] == 0 and stats["chat_requests"] > 0
    report = json.loads(report_path.read_text())
    assert not any(p["invalid"] for p in report["predictions"])
    fitted = [p["context_fit"] for p in report["predictions"] if p["context_fit"]]
    assert fitted and all(f["context_tokens"] == 1800 and "least relevant" in f["order"] for f in fitted)


def test_a_prompt_that_cannot_fit_fails_that_item_with_its_sizes(capsys, tmp_path, server):
    server.reset(n_ctx=900)  # the persona summary still fits (oldest history dropped), no answer prompt does
    report_path = tmp_path / "eval.json"
    code, stdout, _ = run(capsys, "eval", "--task", "LaMP_3", "--max-users", "1", "--initial", "--max-tokens", "300",
                          "--out", str(report_path), *lm_args(server))
    report = json.loads(report_path.read_text())
    assert code == 0 and report["failures"] == [] and report["n_scored"] == 3
    assert all("plus 300 for the reply, more than the model's context of 900 tokens" in p["invalid"]
               for p in report["predictions"])
    assert server.stats()["overflowed"] == 0  # refused before sending, not by the server


def test_a_server_overflow_is_reported_with_both_sizes(capsys, tmp_path, server):
    server.reset(n_ctx=300)
    code, _, stderr = run(capsys, "eval", "--task", "LaMP_3", "--max-users", "1", "--initial", "--context-tokens",
                          "100000", "--out", str(tmp_path / "e.json"), *lm_args(server))  # a wrong declared size
    assert code == 2 and server.stats()["overflowed"] > 0
    assert "the prompt (" in stderr and "exceeds the server's context of 300 tokens" in stderr
    assert "is the LM server" not in stderr


def test_react_with_junk_tool_steps_scores_answers_invalid_and_exits_cleanly(capsys, tmp_path, server):
    server.reset(reply_mode="junk_tool")
    report_path = tmp_path / "eval.json"
    code, stdout, stderr = run(capsys, "eval", "--task", "LaMP_2N", "--max-users", "1", "--initial", "--mode",
                               "react", "--out", str(report_path), *lm_args(server))
    assert code == 0 and "Traceback" not in stderr
    report = json.loads(report_path.read_text())
    totals = report["output_totals"]
    n = report["n_queries"]
    assert totals["invalid"]["tool_step"] == n and totals["invalid"]["answer"] == n
    assert all(p["invalid"] == "unparsable tool step" for p in report["predictions"])
    assert_counts_add_up(report["outputs"], totals, server.stats())


def test_hints_say_what_the_server_did(server):
    from persona_dspy.lm.build import build_lm
    from persona_dspy.lm.server_fit import explain_lm_error

    lm = build_lm("openai/test-model", server.api_base, timeout=30)
    assert "is the LM server at" in explain_lm_error("APIConnectionError: [Errno 111] Connection refused", lm)
    busy = explain_lm_error("litellm.Timeout: APITimeoutError - Request timed out.", lm)
    assert "accepted the request but sent no reply within 30 s" in busy and "running" not in busy
    overflow = explain_lm_error('{"error":{"code":400,"message":"the request exceeds the available context size, '
                                'try increasing it","type":"exceed_context_size_error","n_prompt_tokens":2864,'
                                '"n_ctx":2048}}', lm)
    assert "(2864 tokens) exceeds the server's context of 2048 tokens" in overflow
    assert explain_lm_error("ValueError: something else", lm) == ""


def test_the_context_size_comes_from_the_server(server, tmp_path: Path):
    server.reset(n_ctx=4096)
    assert budget.ask_server(server.api_base) == 4096  # llama.cpp's /props
    server.reset()
    assert budget.ask_server(server.api_base) is None  # no /props, no max_model_len: unknown


def saved_summary_problems(out: Path) -> dict[str, str]:
    """Every saved program's persona summary checked against its user's history: what would make it junk."""
    from persona_dspy.data.lamp import dataset_dir, load_dataset
    from persona_dspy.outputs.validation import rejection
    from persona_dspy.programs import read_program_metadata

    histories = {h.user_id: h for h in load_dataset(dataset_dir("LaMP_3"))}
    problems = {}
    for path in sorted(out.glob("*-*.json")):
        metadata = read_program_metadata(path)
        texts = [item.text for item in histories[metadata["user_id"]].items]
        reason = rejection(metadata["summary"], copied_from=texts)
        if reason is not None:
            problems[path.name] = reason
    return problems


@pytest.mark.parametrize("mode", [None, "junk"], ids=["stand-in", "junk replies"])
def test_no_saved_persona_holds_junk(capsys, tmp_path, server, mode):
    """Fender guitars, a date, a refusal, a looping review, {history} or a copied history line: none is saved."""
    server.reset(reply_mode=mode)
    out = tmp_path / "programs"
    code, stdout, stderr = run(capsys, "compile", "--task", "LaMP_3", "--out", str(out), *lm_args(server))
    assert code in (0, 1), stderr
    saved = list(out.glob("*-*.json"))
    assert saved, stderr  # the evidence summary needs no LM: junk costs the LM's lines, not the user's program
    assert saved_summary_problems(out) == {}
    if mode == "junk":
        for path in saved:
            summary = json.loads(path.read_text())["metadata"]["summary"]
            assert summary.startswith("- Ratings of their ") and "Fender guitars" not in summary
        totals = json.loads((out / "compile_summary.json").read_text())["output_totals"]
        assert totals["invalid"]["summary"] > 0 and totals["fallbacks"]["summary"] > 0  # counted, never kept
