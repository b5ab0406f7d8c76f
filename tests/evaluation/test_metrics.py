"""LaMP's evaluator rules (LaMP-Benchmark/LaMP eval/evaluation.py), checked on hand-computed cases."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import warnings

import pytest
from persona_dspy.signatures.labels import LAMP_1_LABELS, LAMP_2N_LABELS
from rouge_score import rouge_scorer, scoring

from persona_dspy.data.tasks import TASKS
from persona_dspy.evaluation.metrics import (
    aggregate_by_user,
    dspy_metric,
    metric_keys,
    per_example_score,
    primary_metric,
    score_task,
)

# --- classification -------------------------------------------------------------------------------------------


def test_lamp1_accuracy_and_macro_f1_by_hand() -> None:
    # "1" is not a label: LaMP maps it to -1, so it is wrong. Indices: preds [0, 0, 1, -1], golds [0, 1, 1, 0].
    # [1]: tp 1, fp 1, fn 1 -> 2/4.  [2]: tp 1, fp 0, fn 1 -> 2/3.  macro = (1/2 + 2/3) / 2 = 7/12.
    result = score_task("LaMP_1", ["[1]", "[1]", "[2]", "1"], ["[1]", "[2]", "[2]", "[1]"])
    assert result == pytest.approx({"accuracy": 0.5, "f1": 7 / 12})
    # normalize=True turns "1" into "[1]": preds [0, 0, 1, 0]. [1]: tp 2, fp 1 -> 4/5. [2]: 2/3. macro 11/15.
    normalized = score_task("LaMP_1", ["[1]", "[1]", "[2]", "1"], ["[1]", "[2]", "[2]", "[1]"], normalize=True)
    assert normalized == pytest.approx({"accuracy": 0.75, "f1": 11 / 15})


def test_macro_f1_counts_labels_never_predicted_nor_gold() -> None:
    # sklearn f1_score(labels=range(15), average="macro") keeps every listed label: one with no gold and no
    # prediction has precision 0/0 and recall 0/0, which the default zero_division ("warn" -> 0) makes 0, and
    # F1 0; the macro mean still divides by 15. "Politics" (capitalised) is not a label -> -1 -> wrong.
    # politics: tp 1, fp 1, fn 0 -> 2/3. sports: tp 1, fp 0, fn 1 -> 2/3. crime: tp 0 -> 0. 12 others: 0.
    preds = ["politics", "politics", "sports", "Politics"]
    golds = ["politics", "sports", "sports", "crime"]
    result = score_task("LaMP_2N", preds, golds)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3) / len(LAMP_2N_LABELS))


def test_non_labels_agree_in_accuracy_like_lamp() -> None:
    # LaMP compares indices, and two non-labels are both -1: a quirk that only matters for malformed golds.
    assert score_task("LaMP_2N", ["xyz"], ["abc"]) == {"accuracy": 1.0, "f1": 0.0}


def test_classification_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")  # only a cross-check; not a dependency
    rng = random.Random(7)
    for labels, task in ((LAMP_1_LABELS, "LaMP_1"), (LAMP_2N_LABELS, "LaMP_2N")):
        pool = [*labels, "not a label", " politics ", "Sports"]
        for _ in range(20):
            n = rng.randint(1, 30)
            preds = [rng.choice(pool) for _ in range(n)]
            golds = [rng.choice(labels) for _ in range(n)]
            # LaMP's own mapping: str(x).strip(), index in the label list, else -1
            index = {label: i for i, label in enumerate(labels)}
            p = [index.get(x.strip(), -1) for x in preds]
            g = [index.get(x.strip(), -1) for x in golds]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected_f1 = metrics.f1_score(g, p, labels=list(range(len(labels))), average="macro")
            got = score_task(task, preds, golds)
            assert got["accuracy"] == pytest.approx(metrics.accuracy_score(g, p))
            assert got["f1"] == pytest.approx(expected_f1)


# --- rating ---------------------------------------------------------------------------------------------------


def test_mae_rmse_with_unparsable_predictions() -> None:
    # "great" vs gold 2: 5 is farther than 1 -> 5.0, error 3. "nope" vs gold 3: tie -> 5.0 (LaMP uses a strict
    # '>' for choosing 1), error 2. "bad" vs gold 5 -> 1.0, error 4. " 2 " parses after strip.
    preds = ["4", "3.5", "great", "nope", " 2 ", "bad"]
    golds = ["5", "3", "2", "3", "1", "5"]
    errors = [1, 0.5, 3, 2, 1, 4]
    result = score_task("LaMP_3", preds, golds)
    assert result["mae"] == pytest.approx(sum(errors) / 6)
    assert result["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6))


def test_rating_scored_as_given_unless_normalized() -> None:
    assert score_task("LaMP_3", ["4 stars"], ["4"])["mae"] == pytest.approx(3.0)  # unparsable -> 1.0
    assert score_task("LaMP_3", ["4 stars"], ["4"], normalize=True)["mae"] == pytest.approx(0.0)
    assert score_task("LaMP_3", ["nan"], ["2"])["mae"] == pytest.approx(3.0)  # non-finite treated as unparsable


# --- generation -----------------------------------------------------------------------------------------------


def test_rouge_by_hand() -> None:
    # P 3/3, R 3/6 -> F 2/3 for both; the second pair has all unigrams but LCS 2 -> rouge-L 2/3.
    assert score_task("LaMP_4", ["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(
        {"rouge-1": 2 / 3, "rouge-L": 2 / 3}
    )
    assert score_task("LaMP_5", ["mat the on"], ["the mat on"]) == pytest.approx({"rouge-1": 1.0, "rouge-L": 2 / 3})
    # evaluate's defaults: case and punctuation ignored, no stemming ("running" is not "run").
    assert score_task("LaMP_6", ["  Hello, World! "], ["hello world"])["rouge-1"] == pytest.approx(1.0)
    assert score_task("LaMP_7", ["running dogs"], ["run dog"])["rouge-1"] == pytest.approx(0.0)


def test_rouge_matches_rouge_score_mean() -> None:
    preds = ["Trump wins the vote", "new phone released today", "", "stocks fall sharply on Monday"]
    golds = ["Trump wins Senate vote", "Apple releases a new phone", "Big news", "Stocks fell on Monday"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    direct = [scorer.score_multi([g.strip()], p.strip()) for p, g in zip(preds, golds, strict=True)]
    result = score_task("LaMP_4", preds, golds)
    assert result["rouge-1"] == pytest.approx(sum(s["rouge1"].fmeasure for s in direct) / 4)
    assert result["rouge-L"] == pytest.approx(sum(s["rougeL"].fmeasure for s in direct) / 4)


def test_rouge_mean_is_what_evaluates_bootstrap_mid_estimates() -> None:
    """evaluate reports BootstrapAggregator's mid (median of 1000 bootstrap means): near, not equal to, the mean."""
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    words = "the a cat dog sat ran on in mat park big small".split()
    preds = [" ".join(rng.choices(words, k=rng.randint(2, 6))) for _ in range(40)]
    golds = [" ".join(rng.choices(words, k=rng.randint(2, 6))) for _ in range(40)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    aggregator = scoring.BootstrapAggregator()
    for p, g in zip(preds, golds, strict=True):
        aggregator.add_scores(scorer.score_multi([g], p))
    np.random.seed(0)
    mid = aggregator.aggregate()["rouge1"].mid.fmeasure
    assert score_task("LaMP_4", preds, golds)["rouge-1"] == pytest.approx(mid, abs=0.02)


# --- per example, DSPy, per user ------------------------------------------------------------------------------


def test_per_example_score() -> None:
    assert per_example_score("LaMP_2N", "Answer: Politics", "politics") == 1.0
    assert per_example_score("LaMP_2N", "sports", "politics") == 0.0
    assert per_example_score("LaMP_1", "1", "[1]") == 1.0
    assert per_example_score("LaMP_3", "4", "5") == pytest.approx(0.75)
    assert per_example_score("LaMP_3", "4 stars", "4") == pytest.approx(1.0)
    assert per_example_score("LaMP_3", "no idea", "5") == pytest.approx(0.0)  # -> 1.0, error 4
    assert per_example_score("LaMP_3", "no idea", "3") == pytest.approx(0.5)  # tie -> 5.0, error 2
    assert per_example_score("LaMP_3", "9", "1") == 0.0  # out of range: clipped
    assert per_example_score("LaMP_5", "mat the on", "the mat on") == pytest.approx(2 / 3)  # ROUGE-L
    assert per_example_score("LaMP_4", None, "headline") == 0.0


def test_dspy_metric_reads_answer_fields() -> None:
    dspy = pytest.importorskip("dspy")
    metric = dspy_metric("LaMP_2N")
    example = dspy.Example(question="q", answer="politics").with_inputs("question")
    assert metric(example, dspy.Prediction(answer="The category is Politics.")) == 1.0
    assert metric(example, dspy.Prediction(answer="sports"), None) == 0.0
    assert metric(example, dspy.Prediction(reasoning="no answer field")) == 0.0
    assert metric(example, dspy.Prediction(answer="politics"), None, "predict", None) == 1.0  # GEPA's call shape
    assert dspy_metric("lamp-3")({"answer": "4"}, {"answer": "4/5"}) == 1.0
    with pytest.raises(ValueError):
        dspy_metric("LaMP_9")


def test_aggregate_by_user_pools_overall() -> None:
    rows = [("a", "3", "3"), ("a", "4", "4"), ("a", "5", "5"), ("b", "1", "5")]
    result = aggregate_by_user("LaMP_3", rows)
    assert result["overall"]["mae"] == pytest.approx(1.0)  # pooled 4/4, not the mean of users (0 + 4) / 2
    assert result["per_user"]["a"]["mae"] == 0.0
    assert result["per_user"]["b"] == pytest.approx({"mae": 4.0, "rmse": 4.0})
    assert (result["n_examples"], result["n_users"]) == (4, 2)
    normalized = aggregate_by_user("LaMP_2N", [("u", "Politics!", "politics")], normalize=True)
    assert normalized["overall"]["accuracy"] == 1.0


def test_primary_metric() -> None:
    assert primary_metric("LaMP_1") == ("accuracy", True)
    assert primary_metric("LaMP_2M") == ("accuracy", True)
    assert primary_metric("LaMP_3") == ("mae", False)
    assert primary_metric("LaMP_7") == ("rouge-1", True)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metric_keys_are_what_score_task_returns_primary_first(task: str) -> None:
    gold = (TASKS[task].labels or ("a short headline",))[0]
    assert metric_keys(task) == list(score_task(task, [gold], [gold]))
    assert metric_keys(task)[0] == primary_metric(task)[0]


def test_rouge_score_is_imported_only_when_rouge_is_computed() -> None:
    # rouge_score pulls in nltk (~0.6 s): the CLI and label tasks should not pay for it
    code = ("import sys; import persona_dspy.evaluation.metrics as m; assert 'rouge_score' not in sys.modules; "
            "m.score_task('LaMP_3', ['4'], ['4']); assert 'rouge_score' not in sys.modules; "
            "assert m.score_task('LaMP_7', ['a b'], ['a b'])['rouge-1'] == 1.0; assert 'rouge_score' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_score_task_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        score_task("LaMP_1", ["[1]"], ["[1]", "[2]"])
    with pytest.raises(ValueError):
        score_task("LaMP_1", [], [])
