"""LaMP's official metrics, re-implemented so that numbers are comparable with published LaMP results.

Reference: LaMP-Benchmark/LaMP, ``eval/evaluation.py``: accuracy and macro F1 over label indices (a non-label is
wrong), MAE and RMSE for ratings (an unparsable rating counts as the farther of 1 and 5), ROUGE-1 and ROUGE-L
F-measure for generation. Two deliberate deviations, documented where they happen: ROUGE is the exact mean of
per-example scores (LaMP's bootstrap median wobbles run to run), and a rating that parses to inf/nan is unparsable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from persona_dspy.agent.answers import normalize_answer
from persona_dspy.data.tasks import TaskKind, get_task

if TYPE_CHECKING:  # rouge_score pulls in nltk (~0.6 s): imported when a generation task is first scored
    from rouge_score.rouge_scorer import RougeScorer

RATING_MIN = 1.0
RATING_MAX = 5.0

Metric = Callable[..., float]

_METRIC_KEYS: dict[TaskKind, tuple[str, str]] = {
    TaskKind.CLASSIFICATION: ("accuracy", "f1"),
    TaskKind.RATING: ("mae", "rmse"),
    TaskKind.GENERATION: ("rouge-1", "rouge-L"),
}
"""What ``score_task`` returns per kind of task, the primary metric (what LaMP papers rank by) first."""


def primary_metric(task_name: str) -> tuple[str, bool]:
    """(metric key in ``score_task``'s result, higher_is_better): what LaMP papers rank a task by."""
    kind = get_task(task_name).kind
    return _METRIC_KEYS[kind][0], kind is not TaskKind.RATING


def metric_keys(task_name: str) -> list[str]:
    """The keys ``score_task`` returns for a task, primary metric first: the columns reports show."""
    return list(_METRIC_KEYS[get_task(task_name).kind])


def _clean(values: Sequence[Any]) -> list[str]:
    """LaMP's postprocessing: ``str(x).strip()`` (None counts as the empty string)."""
    return ["" if v is None else str(v).strip() for v in values]


# --- classification -------------------------------------------------------------------------------------------


def _accuracy_f1(predictions: list[str], golds: list[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over ``labels`` exactly as LaMP's evaluator gets them from sklearn.

    Strings become label indices or -1. Accuracy compares indices, so (as in LaMP) two non-labels agree.
    Macro-F1 averages per-label F1 over *every* label of the list: sklearn's ``f1_score(labels=...)`` keeps a
    label that is neither predicted nor gold, with F1 0 (precision and recall are 0/0 -> 0), so it drags the
    mean down. -1 is not in ``labels``: a -1 prediction is a false negative of the gold's label, a -1 gold a
    false positive of the predicted label. With zero_division 0, 2PR/(P+R) equals 2tp/(2tp+fp+fn) (0 if 0/0).
    """
    index = {label: i for i, label in enumerate(labels)}
    pred_ids = [index.get(p, -1) for p in predictions]
    gold_ids = [index.get(g, -1) for g in golds]
    accuracy = sum(p == g for p, g in zip(pred_ids, gold_ids, strict=True)) / len(gold_ids)
    f1_sum = 0.0
    for i in range(len(labels)):
        tp = sum(p == i and g == i for p, g in zip(pred_ids, gold_ids, strict=True))
        fp = sum(p == i and g != i for p, g in zip(pred_ids, gold_ids, strict=True))
        fn = sum(g == i and p != i for p, g in zip(pred_ids, gold_ids, strict=True))
        denominator = 2 * tp + fp + fn
        f1_sum += 2 * tp / denominator if denominator else 0.0
    return {"accuracy": accuracy, "f1": f1_sum / len(labels)}


# --- rating ---------------------------------------------------------------------------------------------------


def rating_value(prediction: Any, gold: Any) -> float:
    """The number LaMP scores for a rating prediction: ``float(prediction)``, or when that fails the one of
    1 and 5 farther from the gold (LaMP's penalty: an unparsable answer is as wrong as a rating can be)."""
    text = "" if prediction is None else str(prediction).strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    g = float(str(gold).strip())
    return RATING_MIN if abs(RATING_MIN - g) > abs(RATING_MAX - g) else RATING_MAX


def _mae_rmse(predictions: list[str], golds: list[str]) -> dict[str, float]:
    errors = [rating_value(p, g) - float(g) for p, g in zip(predictions, golds, strict=True)]
    return {
        "mae": sum(abs(e) for e in errors) / len(errors),
        "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
    }


# --- generation -----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _rouge() -> RougeScorer:
    """evaluate's "rouge" defaults: no stemmer, rouge_score's default tokenizer (lowercase, [a-z0-9] tokens)."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_f(prediction: str, gold: str) -> tuple[float, float]:
    """(ROUGE-1 F, ROUGE-L F) of one stripped prediction against one stripped gold."""
    scores = _rouge().score(gold.strip(), prediction.strip())
    return scores["rouge1"].fmeasure, scores["rougeL"].fmeasure


def _rouge_means(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Mean per-example F-measure (the expectation of evaluate's bootstrap 'mid', without its sampling noise)."""
    pairs = [rouge_f(p, g) for p, g in zip(predictions, golds, strict=True)]
    return {
        "rouge-1": sum(r1 for r1, _ in pairs) / len(pairs),
        "rouge-L": sum(rl for _, rl in pairs) / len(pairs),
    }


# --- public API -----------------------------------------------------------------------------------------------


def score_task(
    task_name: str, predictions: Sequence[Any], golds: Sequence[Any], *, normalize: bool = False
) -> dict[str, float]:
    """LaMP's corpus-level metrics for one task.

    Keys: accuracy, f1 (LaMP-1/2) | mae, rmse (LaMP-3) | rouge-1, rouge-L (LaMP-4..7). Predictions are scored
    as given, like LaMP does; ``normalize=True`` first passes them through ``normalize_answer`` (recommended
    for small models, and what ``per_example_score`` always does).
    """
    spec = get_task(task_name)
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    if not golds:
        raise ValueError("nothing to score")
    if normalize:
        predictions = [normalize_answer(spec.name, p) for p in predictions]
    preds, refs = _clean(predictions), _clean(golds)
    if spec.kind is TaskKind.CLASSIFICATION:
        assert spec.labels is not None
        return _accuracy_f1(preds, refs, spec.labels)
    if spec.kind is TaskKind.RATING:
        return _mae_rmse(preds, refs)
    return _rouge_means(preds, refs)


def per_example_score(task_name: str, prediction: Any, gold: Any) -> float:
    """One example's score in [0, 1], higher is better, after ``normalize_answer``: an optimisation signal.

    Labels: exact match. LaMP-3: 1 - |p - g| / 4 with LaMP's unparsable rule (clipped to [0, 1] for
    out-of-range numbers). Generation: ROUGE-L F.
    """
    spec = get_task(task_name)
    pred = normalize_answer(spec.name, None if prediction is None else str(prediction)).strip()
    ref = "" if gold is None else str(gold).strip()
    if spec.kind is TaskKind.CLASSIFICATION:
        return 1.0 if pred == ref else 0.0
    if spec.kind is TaskKind.RATING:
        error = abs(rating_value(pred, ref) - float(ref))
        return min(1.0, max(0.0, 1.0 - error / (RATING_MAX - RATING_MIN)))
    return rouge_f(pred, ref)[1]


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def dspy_metric(task_name: str) -> Metric:
    """A DSPy metric ``metric(example, prediction, trace=None) -> float`` on ``.answer`` fields.

    Also accepts GEPA's extra ``pred_name`` / ``pred_trace`` arguments. A prediction without an answer scores
    as an empty answer (wrong label, worst rating, ROUGE 0).
    """
    name = get_task(task_name).name  # fail now, not in the middle of an optimisation run

    def metric(
        example: Any, prediction: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> float:
        return per_example_score(name, _field(prediction, "answer"), _field(example, "answer"))

    metric.__name__ = f"lamp_metric_{name}"
    return metric


def aggregate_by_user(
    task_name: str, rows: Iterable[tuple[Any, Any, Any]], *, normalize: bool = False
) -> dict[str, Any]:
    """Overall and per-user metrics from ``(user_id, prediction, gold)`` rows.

    ``overall`` pools all examples (what LaMP reports); ``per_user[user_id]`` scores that user's examples alone
    (note macro-F1 still averages over the full label list, so it is low for users with few examples).
    """
    by_user: dict[Any, tuple[list[Any], list[Any]]] = {}
    all_preds: list[Any] = []
    all_golds: list[Any] = []
    for user_id, prediction, gold in rows:
        preds, golds = by_user.setdefault(user_id, ([], []))
        preds.append(prediction)
        golds.append(gold)
        all_preds.append(prediction)
        all_golds.append(gold)
    return {
        "overall": score_task(task_name, all_preds, all_golds, normalize=normalize),
        "per_user": {
            user: score_task(task_name, preds, golds, normalize=normalize) for user, (preds, golds) in by_user.items()
        },
        "n_examples": len(all_golds),
        "n_users": len(by_user),
    }
