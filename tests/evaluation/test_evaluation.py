"""evaluate(): per-user agents in threads, LaMP metrics per user and pooled, LM usage, failures, the report.

All runs use the offline stand-in LM: its scores are plumbing checks, not a model's accuracy.
"""

from __future__ import annotations

import json
from datetime import datetime

import dspy
import pytest

from persona_dspy import programs
from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.data.lamp import dataset_dir, load_dataset
from persona_dspy.evaluation.evaluate import OFFLINE_NOTE, EvalReport, evaluate
from persona_dspy.evaluation.metrics import score_task
from persona_dspy.evaluation.tables import format_table
from persona_dspy.lm.usage import LMUsage
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.testing.offline_lm import OFFLINE_MODEL, offline_lm

METRIC_KEYS = {"LaMP_2N": {"accuracy", "f1"}, "LaMP_3": {"mae", "rmse"}}


@pytest.fixture(scope="module")
def datasets(bm25_embedder):
    """Both shipped samples ingested once into one in-process memory (users never overlap across tasks)."""
    memory = EpisodicMemory(":memory:", embedder=bm25_embedder)
    loaded = {task: load_dataset(dataset_dir(task)) for task in METRIC_KEYS}
    for histories in loaded.values():
        memory.add_histories(histories)
    yield loaded, memory
    memory.close()


@pytest.mark.parametrize("mode", ["rag", "react", "none"])
@pytest.mark.parametrize("task", ["LaMP_2N", "LaMP_3"])
def test_offline_report(datasets, task, mode, tmp_path):
    loaded, memory = datasets
    histories = loaded[task]
    n_users, n_queries = len(histories), sum(len(h.queries) for h in histories)
    report = evaluate(histories, memory=memory, mode=mode, lm=offline_lm(), workers=3, progress=False)

    assert (report.task, report.mode, report.k, report.workers) == (task, mode, 5, 3)
    assert report.failures == [] and report.skipped_users == [] and report.complete
    assert (report.n_users, report.n_queries, report.n_scored) == (n_users, n_queries, n_queries)
    assert set(report.overall) == METRIC_KEYS[task]
    assert list(report.per_user) == [h.user_id for h in histories]  # dataset order, whatever finished first
    assert all(set(metrics) == METRIC_KEYS[task] for metrics in report.per_user.values())
    # overall pools every example (LaMP's number), it is not a mean of the per-user numbers
    preds = [r.prediction for r in report.predictions]
    assert report.overall == score_task(task, preds, [r.gold for r in report.predictions])
    expected_ids = [(h.user_id, q.id) for h in histories for q in h.queries]
    assert [(r.user_id, r.query_id) for r in report.predictions] == expected_ids
    golds = {q.id: q.gold for h in histories for q in h.queries}
    assert all(r.gold == golds[r.query_id] and r.raw_answer and 0.0 <= r.score <= 1.0 for r in report.predictions)
    if mode == "rag":  # BM25 returns at most k items sharing a word with the query, all from the query's profile
        profiles = {q.id: q.profile_ids for h in histories for q in h.queries}
        assert all(1 <= len(r.passage_ids) <= 5 and set(r.passage_ids) <= profiles[r.query_id]
                   for r in report.predictions)
    else:
        assert all(r.passage_ids == () for r in report.predictions)

    # LM usage counted across threads: one persona summary per user, then per query one call (rag, none) or a
    # ReAct loop (tool step, finish step, extract)
    expected_calls = {"rag": n_users + n_queries, "none": n_queries, "react": n_users + 3 * n_queries}[mode]
    assert report.calls == expected_calls
    assert report.tokens["unmetered_calls"] == 0 and report.tokens["errors"] == 0
    assert report.tokens["total_tokens"] == report.tokens["prompt_tokens"] + report.tokens["completion_tokens"] > 0

    assert report.offline and report.note == OFFLINE_NOTE
    assert report.lm["model"] == OFFLINE_MODEL and report.lm["offline"] is True
    assert report.primary_metric == ("accuracy" if task == "LaMP_2N" else "mae")
    assert report.higher_is_better is (task == "LaMP_2N")
    assert {"python", "persona-dspy", "dspy", "litellm"} <= set(report.versions)
    assert datetime.fromisoformat(report.created).tzinfo is not None and report.wall_seconds >= 0

    table = report.summary_table()
    assert f"NOTE: {OFFLINE_NOTE}" in table and "pooled" in table
    assert all(h.user_id in table for h in histories) and f"{report.calls} LM calls" in table

    data = json.loads(report.to_json(tmp_path / "sub" / "report.json").read_text())
    assert data["note"] == OFFLINE_NOTE and data["offline"] is True and data["calls"] == report.calls
    assert data["overall"] == report.overall and data["n_scored"] == n_queries
    assert data["predictions"][0].keys() >= {"user_id", "query_id", "prediction", "raw_answer", "gold"}


def test_one_failing_user_is_recorded_and_the_others_complete(datasets):
    loaded, memory = datasets
    histories = loaded["LaMP_2N"]
    broken_at_start, broken_mid_way = histories[1].user_id, histories[3].user_id

    class FailsOnSecondQuery(PersonaAgent):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.answered = 0

        def forward(self, query, scope=None):
            self.answered += 1
            if self.answered == 2:
                raise RuntimeError("backend fell over")
            return super().forward(query, scope)

    def factory(history):
        if history.user_id == broken_at_start:
            raise ValueError(f"no persona for {history.user_id}")
        cls = FailsOnSecondQuery if history.user_id == broken_mid_way else PersonaAgent
        return cls("LaMP_2N", memory, "rag")

    report = evaluate(histories, memory=memory, lm=offline_lm(), workers=3, agent_factory=factory, progress=False)
    failures = {f.user_id: f for f in report.failures}
    assert set(failures) == {broken_at_start, broken_mid_way} and not report.complete
    first = failures[broken_at_start]
    assert (first.error_type, first.stage, first.n_queries) == ("ValueError", "persona", 3)
    assert broken_at_start in first.error
    second = failures[broken_mid_way]
    assert second.error_type == "RuntimeError" and second.error == "backend fell over"
    assert second.stage == f"query {histories[3].queries[1].id}"
    completed = [h.user_id for h in histories if h.user_id not in failures]
    assert list(report.per_user) == completed  # a failed user is scored nowhere, not even their answered queries
    assert {r.user_id for r in report.predictions} == set(completed)
    assert report.n_scored == 3 * len(completed) and report.skipped_users == []
    table = report.summary_table()
    assert f"FAILED {broken_at_start} at persona: ValueError" in table


def test_max_failures_skips_users_not_started():
    histories = load_dataset(dataset_dir("LaMP_3"))

    def factory(history):
        raise ConnectionError("server unreachable")

    report = evaluate(histories, memory=None, lm=offline_lm(), workers=1, agent_factory=factory, progress=False,
                      max_failures=2)
    assert [f.user_id for f in report.failures] == [h.user_id for h in histories[:2]]
    assert report.skipped_users == [h.user_id for h in histories[2:]]
    assert report.overall == {} and report.per_user == {} and report.n_scored == 0 and report.calls == 0
    assert "SKIPPED 4 users" in report.summary_table()


@pytest.mark.parametrize("mode", ["rag", "react"])
def test_threads_give_the_same_predictions_as_one_worker(datasets, mode):
    loaded, memory = datasets
    histories = loaded["LaMP_2N"]
    one = evaluate(histories, memory=memory, mode=mode, lm=offline_lm(), workers=1, progress=False)
    three = evaluate(histories, memory=memory, mode=mode, lm=offline_lm(), workers=3, progress=False)
    assert three.predictions == one.predictions
    assert (three.overall, three.per_user, three.calls) == (one.overall, one.per_user, one.calls)
    assert three.tokens == one.tokens


def test_the_callers_dspy_context_reaches_the_workers(datasets):
    """Settings the caller made with dspy.context (here a callback of its own) apply inside every worker."""
    loaded, memory = datasets
    outer = LMUsage()
    with dspy.context(callbacks=[outer]):
        report = evaluate(loaded["LaMP_3"], memory=memory, lm=offline_lm(), workers=3, progress=False)
    assert outer.calls == report.calls == 24


def test_invalid_arguments_fail_before_any_call(datasets):
    loaded, memory = datasets
    histories = loaded["LaMP_3"]
    lm = offline_lm()
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate(histories, memory=memory, mode="chat", lm=lm)
    with pytest.raises(ValueError, match="workers"):
        evaluate(histories, memory=memory, lm=lm, workers=0)
    with pytest.raises(ValueError, match="needs a memory"):
        evaluate(histories, memory=None, mode="rag", lm=lm)
    with pytest.raises(ValueError, match="one task"):
        evaluate(histories + loaded["LaMP_2N"], memory=memory, lm=lm)
    with pytest.raises(ValueError, match="no users"):
        evaluate([], memory=memory, lm=lm)
    assert lm.history == []


def test_report_is_a_dataclass_with_a_json_form(datasets):
    loaded, memory = datasets
    report = evaluate(loaded["LaMP_3"][:2], memory=None, mode="none", lm=offline_lm(), progress=False)
    assert isinstance(report, EvalReport)
    data = report.to_dict()
    assert data["mode"] == "none" and data["k"] == 5 and len(data["predictions"]) == 6
    json.dumps(data)  # plain data all the way down


def test_the_report_is_written_atomically(tmp_path, monkeypatch):
    histories = load_dataset(dataset_dir("LaMP_3"))[:2]
    report = evaluate(histories, memory=None, mode="none", lm=offline_lm(), workers=1, progress=False)
    path = report.to_json(tmp_path / "report.json")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(programs.os, "replace", crash)
    report.calls += 1
    with pytest.raises(OSError, match="disk full"):
        report.to_json(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_summary_table_lines_up_numbers_and_sets_the_pooled_row_apart():
    histories = load_dataset(dataset_dir("LaMP_3"))[:2]
    report = evaluate(histories, memory=None, mode="none", lm=offline_lm(), workers=1, progress=False)
    lines = report.summary_table().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("user "))
    header, rule, first, second, rule_again, pooled = lines[at:at + 6]
    assert header.split() == ["user", "queries", "invalid", "mae", "rmse"]
    assert set(rule) == set(rule_again) == {"-", " "}
    assert first.startswith(histories[0].user_id) and second.startswith(histories[1].user_id)
    assert pooled.startswith("ALL (2 users, pooled)") and f"{report.overall['mae']:.4f}" in pooled
    assert len({len(line) for line in (header, rule, first, second, pooled)}) == 1  # right-aligned numbers end even


def test_format_table_options():
    rows = [{"name": "a", "n": 3, "score": 0.5, "s": 1.234}, {"name": "bb", "n": 12, "score": None, "s": 10.0}]
    plain = format_table(rows)
    assert plain.splitlines() == ["name  n   score  s", "a     3   0.500  1.234", "bb    12         10.000"]
    table = format_table(rows, digits=4, formats={"s": ".1f"}, missing="-", align_numbers_right=True, rule=True,
                         footer=[{"name": "ALL", "n": 15, "score": 0.5}])
    assert table.splitlines() == [
        "name   n   score     s",
        "----  --  ------  ----",
        "a      3  0.5000   1.2",
        "bb    12       -  10.0",
        "----  --  ------  ----",
        "ALL   15  0.5000     -",
    ]
