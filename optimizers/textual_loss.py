"""The textual loss: an LLM's feedback on one answer, against the user's real answer.

One object serves the persona aligner (its loss step) and GEPA (as its feedback metric), so both optimize with the
same signal, on any program's field names (read from the examples and signatures, or named). A failure inside it is
never silent: GEPA would only log it, so it is logged as an error, recorded in ``failures`` and re-raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import dspy
from persona_dspy.signatures.persona import TextualLoss

from persona_dspy.outputs.text import TextOutput, predict_text

logger = logging.getLogger(__name__)

Metric = Callable[..., float | bool]

MAX_VALUE_CHARS = 1500
NO_PREDICTION = "(no answer: the program failed)"
MISSING = "(missing)"


class MetricError(RuntimeError):
    """The metric, or the feedback LM call inside it, failed on an example."""


def score_of(metric: Metric, example: dspy.Example, prediction: Any) -> float:
    """The metric's value as a float; metrics returning a ``dspy.Prediction`` (GEPA style) give their ``.score``."""
    value = metric(example, prediction)
    return float(value.score if hasattr(value, "score") else value)


def _keys(record: Any) -> list[str]:
    if record is None:
        return []
    if isinstance(record, Mapping):
        return list(record)
    keys = getattr(record, "keys", None)
    return list(keys()) if callable(keys) else []


def _value(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None) if name in _keys(record) else None


def _shown(value: Any) -> bool:
    """Whether an input is worth showing the loss LM: text and numbers, not objects (scopes, memories, tools)."""
    if isinstance(value, str | int | float | bool):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) for v in value)


def _text(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + " ..."


def name_lines(values: Mapping[str, Any]) -> str:
    """``name: value`` lines, the form every field reaches the loss LM in."""
    return "\n".join(f"{name}: {_text(value)}" for name, value in values.items())


@dataclass(frozen=True)
class ProgramFields:
    """Which fields of an example the program reads and which it must produce."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def example_inputs(example: dspy.Example) -> list[str]:
    try:
        return list(example.inputs().keys())
    except ValueError as exc:
        raise ValueError("the example has no inputs set: call example.with_inputs(...) or pass input_fields") from exc


def resolve_fields(example: dspy.Example, prediction: Any = None, *, input_fields: Sequence[str] | None = None,
                   output_fields: Sequence[str] | None = None,
                   declared_outputs: Iterable[str] = ()) -> ProgramFields:
    """The program's input and output fields for one example (module docstring); ValueError when none can be told."""
    inputs = list(input_fields) if input_fields is not None else example_inputs(example)
    if output_fields is not None:
        outputs = list(output_fields)
    else:
        labels = [k for k in example.keys() if k not in inputs]
        produced = set(_keys(prediction)) or set(declared_outputs)
        outputs = [k for k in labels if k in produced]
    if not outputs:
        raise ValueError(f"cannot tell which of the example's fields {sorted(example.keys())} the program produces "
                         f"(its prediction has {sorted(_keys(prediction))}): pass output_fields")
    return ProgramFields(tuple(inputs), tuple(outputs))


class TextualLossMetric:
    """Task metric plus LLM-written feedback.

    ``metric(example, prediction) -> float`` scores the answer; ``lm`` (default: the current LM)
    writes the feedback. Called with GEPA's signature it returns ``dspy.Prediction(score, feedback)``;
    the persona the feedback is about comes from the predictor in ``pred_trace`` when GEPA gives one.
    GEPA scores every rollout without ``pred_name`` and reads feedback only when it reflects (with
    ``pred_name``), so a score-only call returns the score and spends no LM call.

    ``input_fields`` / ``output_fields`` name the program's fields when the examples cannot tell (module docstring).
    """

    def __init__(self, metric: Metric, lm: dspy.LM | None = None, *, input_fields: Sequence[str] | None = None,
                 output_fields: Sequence[str] | None = None, declared_outputs: Iterable[str] = ()) -> None:
        self.metric = metric
        self.lm = lm
        self.input_fields = tuple(input_fields) if input_fields is not None else None
        self.output_fields = tuple(output_fields) if output_fields is not None else None
        self.declared_outputs = tuple(declared_outputs)
        self.loss = dspy.Predict(TextualLoss)
        self.failures: list[dict[str, str]] = []

    def fields(self, example: dspy.Example, prediction: Any = None) -> ProgramFields:
        return resolve_fields(example, prediction, input_fields=self.input_fields, output_fields=self.output_fields,
                              declared_outputs=self.declared_outputs)

    def loss_inputs(self, example: dspy.Example, prediction: Any, persona: str) -> dict[str, str]:
        """The loss prompt's inputs: the inputs that matter, expected and produced outputs by name, the persona."""
        fields = self.fields(example, prediction)
        shown = {name: example.get(name) for name in fields.inputs if _shown(example.get(name))}
        expected = {name: example.get(name, MISSING) for name in fields.outputs}
        if prediction is None:
            produced = NO_PREDICTION
        else:
            values = {name: _value(prediction, name) for name in fields.outputs}
            produced = name_lines({k: MISSING if v is None else v for k, v in values.items()})
        evidence = _value(prediction, "evidence") if prediction is not None else None
        inputs = name_lines(shown) or "(none shown)"
        if isinstance(evidence, str) and evidence.strip():  # what the program saw of the user's memory, as it saw it
            inputs += f"\nuser's past items shown to the assistant (item -> their answer):\n{_text(evidence)}"
        return {"program_inputs": inputs, "expected_outputs": name_lines(expected),
                "produced_outputs": produced, "persona": persona}

    def feedback(self, example: dspy.Example, prediction: Any, persona: str) -> str:
        """One LM call: what the persona missed about this user on this item (a note when the reply was rejected)."""
        output = self.feedback_output(example, prediction, persona)
        return output.text or f"(no usable feedback: {output.invalid})"

    def feedback_output(self, example: dspy.Example, prediction: Any, persona: str) -> TextOutput:
        """``feedback``, saying whether the reply had to be read as raw text (see ``text_outputs``)."""
        inputs = self.loss_inputs(example, prediction, persona)
        with dspy.context(lm=self.lm) if self.lm is not None else nullcontext():
            return predict_text(self.loss, "feedback", step="loss", **inputs)

    def __call__(self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None,
                 pred_trace: Any = None) -> float | dspy.Prediction:
        try:
            score = score_of(self.metric, gold, pred)
            if pred_name is None:
                return score
            persona = "(not shown)"
            if pred_trace:
                predictor = pred_trace[0][0]
                persona = getattr(getattr(predictor, "signature", None), "instructions", persona)
            return dspy.Prediction(score=score, feedback=self.feedback(gold, pred, persona))
        except Exception as exc:  # GEPA would log it at INFO and go on: record it, say it loudly, re-raise
            self.failures.append({"pred_name": str(pred_name), "error": f"{type(exc).__name__}: {exc}"})
            logger.error("TextualLossMetric failed%s: %s: %s", f" for {pred_name}" if pred_name else "",
                         type(exc).__name__, exc)
            raise

    def raise_failures(self) -> None:
        """Raise ``MetricError`` if any call of this metric failed (GEPA and Evaluate only log them)."""
        if self.failures:
            first = self.failures[0]
            raise MetricError(f"the feedback metric failed {len(self.failures)} time(s); first: {first['error']}")

    def stop_on_failure(self) -> Callable[[Any], bool]:
        """A GEPA stop hook (``gepa_kwargs={"stop_callbacks": [...]}``) that raises as soon as this metric failed."""

        def check(state: Any) -> bool:
            self.raise_failures()
            return False

        return check
