"""The textual loss: an LLM's feedback on one answer, against the user's real answer.

One object serves both the persona aligner (its loss step) and GEPA (as the five-argument
feedback metric returning a score and feedback), so both optimize with the same signal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import dspy

from optimizers.text_outputs import TextOutput, predict_text
from signatures.persona import TextualLoss

logger = logging.getLogger(__name__)

Metric = Callable[..., float | bool]


def score_of(metric: Metric, example: dspy.Example, prediction: Any) -> float:
    """The metric's value as a float; metrics returning a ``dspy.Prediction`` (GEPA style) give their ``.score``."""
    value = metric(example, prediction)
    return float(value.score if hasattr(value, "score") else value)


class TextualLossMetric:
    """Task metric plus LLM-written feedback.

    ``metric(example, prediction) -> float`` scores the answer; ``lm`` (default: the current LM)
    writes the feedback. Called with GEPA's signature it returns ``dspy.Prediction(score, feedback)``;
    the persona the feedback is about comes from the predictor in ``pred_trace`` when GEPA gives one.
    GEPA scores every rollout without ``pred_name`` and reads feedback only when it reflects (with
    ``pred_name``), so a score-only call returns the score and spends no LM call.
    """

    def __init__(self, metric: Metric, lm: dspy.LM | None = None, answer_field: str = "answer") -> None:
        self.metric = metric
        self.lm = lm
        self.answer_field = answer_field
        self.loss = dspy.Predict(TextualLoss)

    def feedback(self, example: dspy.Example, prediction: Any, persona: str) -> str:
        """One LM call: what the persona missed about this user on this item."""
        return self.feedback_output(example, prediction, persona).text

    def feedback_output(self, example: dspy.Example, prediction: Any, persona: str) -> TextOutput:
        """``feedback``, saying whether the reply had to be read as raw text (see ``text_outputs``)."""
        produced = getattr(prediction, self.answer_field, None) if prediction is not None else None
        with dspy.context(lm=self.lm) if self.lm is not None else nullcontext():
            produced_text = str(produced) if produced is not None else "(no answer: the program failed)"
            return predict_text(self.loss, "feedback", question=str(example.query),
                                expected_answer=str(example[self.answer_field]), produced_answer=produced_text,
                                persona=persona)

    def __call__(self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None,
                 pred_trace: Any = None) -> float | dspy.Prediction:
        score = score_of(self.metric, gold, pred)
        if pred_name is None:
            return score
        persona = "(not shown)"
        if pred_trace:
            predictor = pred_trace[0][0]
            persona = getattr(getattr(predictor, "signature", None), "instructions", persona)
        return dspy.Prediction(score=score, feedback=self.feedback(gold, pred, persona))
