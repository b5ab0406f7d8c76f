"""compare_optimizers(): every optimizer on the same users and data, costs counted, failures recorded, files written.

All runs use the offline stand-in LM: its scores are plumbing checks, not a model's accuracy.
"""

from __future__ import annotations

import csv
import json

import dspy
import pytest
from persona_dspy.optimizers.textual_loss import TextualLossMetric

from persona_dspy import programs
from persona_dspy.data.examples import interaction_examples, query_examples
from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
from persona_dspy.evaluation.metrics import dspy_metric
from persona_dspy.jobs.comparison import (
    DEFAULT_OPTIMIZERS,
    OptimizerSpec,
    compare_optimizers,
    contenders,
    harness,
    plot_score_vs_calls,
)
from persona_dspy.lm.providers import OFFLINE_MODEL
from persona_dspy.lm.usage import LMUsage
from persona_dspy.testing.offline_lm import offline_lm

N_USERS = 2
COMPILES_WITH_LM = ("persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot")


class Boom(dspy.Module):
    def forward(self, **kwargs):
        raise RuntimeError("this program cannot answer")


def raising_compile(inputs):
    raise RuntimeError("optimizer exploded")


RAISING = OptimizerSpec("raising", raising_compile, description="always raises while compiling")
BROKEN_PROGRAM = OptimizerSpec("broken_program", lambda inputs: Boom(), description="compiles a program that raises")


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3", N_USERS)


@pytest.fixture(scope="module")
def run(lamp3):
    """One comparison: the defaults, with a bogus name and two failing contenders mixed in between them."""
    histories, memory = lamp3
    total = LMUsage()  # on the LM itself: sees every request, whoever makes it (LM copies keep their callbacks)
    lm = offline_lm(callbacks=[total])
    names = [*DEFAULT_OPTIMIZERS[:3], "no_such_optimizer", RAISING, *DEFAULT_OPTIMIZERS[3:5], BROKEN_PROGRAM,
             *DEFAULT_OPTIMIZERS[5:]]
    report = compare_optimizers(histories, memory=memory, lm=lm, optimizers=names, progress=False)
    return report, total, histories


def test_every_optimizer_has_a_score_or_a_failure_reason(run):
    report, _, histories = run
    names = [r.name for r in report.results]
    assert names == [*DEFAULT_OPTIMIZERS[:3], "no_such_optimizer", "raising", *DEFAULT_OPTIMIZERS[3:5],
                     "broken_program", *DEFAULT_OPTIMIZERS[5:]]
    for name in DEFAULT_OPTIMIZERS:  # the failures in between stopped none of them
        result = report.result(name)
        assert result.status == "ok" and result.n_users_scored == N_USERS and not result.failures, name
        assert set(result.test) == set(result.val) == {"mae", "rmse"}
        assert 0 <= result.test["mae"] <= 4 and all(u.status == "ok" for u in result.users)
        assert [u.user_id for u in result.users] == [h.user_id for h in histories]
    bogus = report.result("no_such_optimizer")
    assert bogus.status == "failed" and "unknown optimizer" in bogus.error and bogus.test == {}
    raising = report.result("raising")
    assert raising.status == "failed" and raising.n_users_scored == 0
    assert [(f["stage"], f["error_type"], f["error"]) for f in raising.failures] == \
        [("compile", "RuntimeError", "optimizer exploded")] * N_USERS
    broken = report.result("broken_program")
    assert broken.status == "failed" and {f["stage"] for f in broken.failures} == {"test"}
    assert all("cannot answer" in f["error"] for f in broken.failures)
    table = report.table()
    assert f"NOTE: {OFFLINE_NOTE}" in table and "FAILED raising on" in table and "no_such_optimizer" in table


def test_same_users_trainset_and_validation_slice_for_all(run):
    report, _, histories = run
    for history in histories:
        train_ids = [str(ex.example_id) for ex in interaction_examples(history, 3)]
        test_ids = [str(ex.example_id) for ex in query_examples(history)]
        assert len(train_ids) == 3
        info = report.users[history.user_id]
        assert info["trainset_ids"] == info["valset_ids"] == train_ids and info["test_ids"] == test_ids
        for result in report.results:
            for user in (u for u in result.users if u.user_id == history.user_id):
                assert (user.trainset_ids, user.valset_ids, user.test_ids) == (train_ids, train_ids, test_ids)
                if user.status == "ok":
                    assert [p["example_id"] for p in user.test_predictions] == test_ids
                    assert [p["example_id"] for p in user.val_predictions] == train_ids
        # the initial persona is computed once and is where every personalized optimizer starts
        assert info["initial_persona_usage"]["calls"] == 1
        assert report.result("initial").users[histories.index(history)].instructions == info["initial_persona"]
        start = report.result("persona_aligner").users[histories.index(history)].details["alignment"]
        assert start["trainset_size"] == start["valset_size"] == 3


def test_lm_calls_are_counted_compile_apart_from_eval(run):
    report, total, _ = run
    assert report.persona_usage["calls"] == N_USERS
    for name in DEFAULT_OPTIMIZERS:
        result = report.result(name)
        # every test query and validation example is one chain-of-thought call in modes rag and none
        assert all(u.eval_calls == len(u.test_ids) + len(u.valset_ids) for u in result.users), name
        assert result.eval_tokens > 0
        if name in COMPILES_WITH_LM:
            assert all(u.compile_calls > 0 for u in result.users) and result.compile_tokens > 0, name
        else:
            assert result.compile_calls == 0 and result.compile_tokens == 0, name
    assert 0 < report.result("persona_aligner").compile_calls_per_user <= 24  # its documented budget: at most 24
    assert report.result("bootstrap_fewshot").compile_calls_per_user == 3  # one teacher run per interaction
    assert all(u.n_demos == 3 for u in report.result("bootstrap_fewshot").users)
    # nothing escapes the callbacks: every request the LM recorded is attributed to exactly one place
    counted = report.persona_usage["calls"] + sum(r.compile_calls + r.eval_calls for r in report.results)
    assert counted == total.calls > 0


def test_report_records_the_lm_and_the_offline_flag(run):
    report, _, _ = run
    assert report.offline and report.note == OFFLINE_NOTE
    assert report.lm["model"] == OFFLINE_MODEL and report.optimizer_lm is None
    assert (report.task, report.primary_metric, report.higher_is_better) == ("LaMP_3", "mae", False)
    assert report.result("gepa").settings["max_metric_calls"] == contenders.GEPA_MAX_METRIC_CALLS
    assert report.result("miprov2").settings["max_labeled_demos"] == 0
    # what each DSPy optimizer actually ran, per user
    for user in report.result("gepa").users:
        assert user.details["candidates"] >= 1  # GEPA may overshoot its budget by the minibatch it is running
        assert user.details["total_metric_calls"] <= contenders.GEPA_MAX_METRIC_CALLS + 3
    assert all(u.details["trials"] > 0 for u in report.result("miprov2").users)
    assert all(u.details["candidates_evaluated"] == u.details["candidates_planned"] == 6
               for u in report.result("copro").users)


def test_json_and_csv_are_written_and_readable(run, tmp_path):
    report, _, _ = run
    paths = report.save(tmp_path / "out")
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["offline"] is True and data["note"] == OFFLINE_NOTE and data["lm"]["model"] == OFFLINE_MODEL
    assert [r["name"] for r in data["results"]] == [r.name for r in report.results]
    gepa = next(r for r in data["results"] if r["name"] == "gepa")
    assert gepa["test"] == report.result("gepa").test and gepa["compile_calls_per_user"] > 0
    with paths["csv"].open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["optimizer"] for row in rows] == [r.name for r in report.results]
    aligner = next(row for row in rows if row["optimizer"] == "persona_aligner")
    assert float(aligner["test_mae"]) == pytest.approx(report.result("persona_aligner").test["mae"])
    assert aligner["offline"] == "True" and aligner["note"] == OFFLINE_NOTE
    assert next(row for row in rows if row["optimizer"] == "raising")["failure_reasons"].count("exploded") == N_USERS
    with paths["users_csv"].open(encoding="utf-8") as handle:
        user_rows = list(csv.DictReader(handle))
    assert len(user_rows) == sum(len(r.users) for r in report.results)
    assert {row["status"] for row in user_rows if row["optimizer"] == "broken_program"} == {"failed"}


def test_a_failed_save_leaves_the_previous_files_whole(run, tmp_path, monkeypatch):
    report, _, _ = run
    paths = report.save(tmp_path)
    before = {kind: path.read_bytes() for kind, path in paths.items()}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(programs.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.to_json(paths["json"])
    with pytest.raises(OSError, match="disk full"):
        report.to_csv(paths["csv"])
    assert {kind: path.read_bytes() for kind, path in paths.items()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_is_saved(run, tmp_path):
    pytest.importorskip("matplotlib")
    report, _, _ = run
    figure = plot_score_vs_calls(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes[0].collections) == len(DEFAULT_OPTIMIZERS)  # one point per optimizer that scored


def test_initial_persona_failure_fails_only_personalized_optimizers(lamp3, monkeypatch):
    histories, memory = lamp3
    real = harness.initial_persona

    def flaky(history):
        if history.user_id == histories[0].user_id:
            raise ConnectionError("server down")
        return real(history)

    monkeypatch.setattr(harness, "initial_persona", flaky)
    report = compare_optimizers(histories, memory=memory, lm=offline_lm(), optimizers=("initial", "non_personalized"),
                                progress=False)
    initial = report.result("initial")
    assert initial.status == "partial" and initial.n_users_scored == N_USERS - 1
    assert initial.failures[0]["stage"] == "initial_persona" and "server down" in initial.failures[0]["error"]
    assert report.result("non_personalized").status == "ok"


def test_bad_arguments_are_refused(lamp3):
    histories, memory = lamp3
    with pytest.raises(ValueError, match="unique"):
        compare_optimizers(histories, memory=memory, lm=offline_lm(), optimizers=("initial", "initial"))
    with pytest.raises(ValueError, match="no users"):
        compare_optimizers([], memory=memory, lm=offline_lm())


def test_gepa_feedback_calls_the_lm_only_when_feedback_is_read(lamp3):
    histories, memory = lamp3
    example = interaction_examples(histories[0], 1)[0]
    feedback = TextualLossMetric(dspy_metric("LaMP_3"))
    lm = offline_lm()
    prediction = dspy.Prediction(answer=str(example.answer))
    with dspy.context(lm=lm):
        assert feedback(example, prediction) == 1.0 and len(lm.history) == 0
        scored = feedback(example, prediction, None, "reason.program.predict", None)
    assert scored.score == 1.0 and scored.feedback and len(lm.history) == 1


def test_gepa_with_a_failing_feedback_metric_is_a_failure_not_an_unchanged_result(lamp3):
    """GEPA only logs a metric that fails while it reflects; the comparison must not score the untouched program."""
    from persona_dspy.testing.offline_lm import OfflineEngine

    class NoFeedback(OfflineEngine):
        def complete(self, request):
            system = request.system if isinstance(request.system, str) else "".join(
                p.text for p in request.system or [])
            if "`produced_outputs`" in system:
                raise ConnectionError("loss LM down")
            return super().complete(request)

    histories, memory = lamp3
    broken = dspy.LM("offline/no-feedback", engine=NoFeedback(), cache=False, num_retries=0)
    report = compare_optimizers(histories[:1], memory=memory, lm=offline_lm(), optimizer_lm=broken,
                                optimizers=("gepa",), progress=False)
    gepa = report.result("gepa")
    assert gepa.status == "failed" and gepa.n_users_scored == 0
    assert gepa.failures[0]["error_type"] == "MetricError" and "loss LM down" in gepa.failures[0]["error"]
