"""PersonaAligner by dspy's conventions, on programs written here: no silent widening, results like COPRO's and
MIPROv2's, keywords passed through, answers in parallel, a seed.

Each program answers ``label`` from a ``question``; the user always answers "blue" while the evidence says "red".
"""

from __future__ import annotations

import logging
import random
import threading

import dspy
import pytest
from persona_dspy.optimizers.persona_aligner import PersonaAligner
from persona_dspy.optimizers.persona_gepa import persona_gepa
from test_foreign_programs import LABEL, NOTES, PERSONA, metric, recent

from persona_dspy.testing.offline_lm import OfflineEngine, offline_lm


class RewriteThenAnswer(dspy.Module):
    """A rewriting step (no persona) and an answering step whose instructions are the persona."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrite = dspy.Predict(dspy.Signature("question -> search_query", "Rewrite as a search query."))
        self.answer = dspy.ChainOfThought(dspy.Signature(f"question, passages -> {LABEL}", PERSONA))

    def forward(self, question: str) -> dspy.Prediction:
        query = self.rewrite(question=question).search_query
        return self.answer(question=question, passages=f"{query}: {NOTES}")


def answering() -> dspy.Module:
    return dspy.ChainOfThought(dspy.Signature(f"question, passages -> {LABEL}", PERSONA))


def evidence_examples(n: int = 4) -> list[dspy.Example]:
    return [dspy.Example(question=f"Colour of item {i}?", passages=NOTES, label="blue")
            .with_inputs("question", "passages") for i in range(n)]


class ThreadRecording(OfflineEngine):
    """The stand-in, noting the thread of each call; a worker's first call waits (up to 30 s) for a second call to
    be in flight with it, so a parallel run shows overlap whatever the machine's load, and a sequential one cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.overlapped = False
        self._in_flight = 0
        self._changed = threading.Condition()

    def complete(self, request):
        worker = threading.current_thread().name.startswith("persona-align")
        with self._changed:
            self.threads.append(threading.current_thread().name)
            self._in_flight += 1
            if self._in_flight >= 2:
                self.overlapped = True
                self._changed.notify_all()
            if worker:
                self._changed.wait_for(lambda: self.overlapped, timeout=30)
        try:
            return super().complete(request)
        finally:
            with self._changed:
                self._in_flight -= 1


# -- 1: no silent widening ---------------------------------------------------------------------------------------


def test_an_explicit_persona_no_predictor_contains_raises_naming_the_predictors_and_the_text():
    program = RewriteThenAnswer()
    lm = offline_lm()
    with dspy.context(lm=lm), pytest.raises(ValueError) as raised:
        PersonaAligner(metric, persona="You answer as this particlar user would").compile(program, trainset=recent())
    message = str(raised.value)
    assert "'rewrite'" in message and "'answer.predict'" in message and "particlar" in message
    assert lm.engine.calls == 0  # before any LM call
    with pytest.raises(ValueError, match="particlar"):
        persona_gepa(program, metric, reflection_lm=offline_lm(), persona="particlar", max_metric_calls=5)


def test_without_a_persona_the_documented_default_still_widens_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING), dspy.context(lm=offline_lm()):
        PersonaAligner(metric, iterations=1).compile(RewriteThenAnswer(), trainset=recent())
    assert "all 2 predictors carry the persona" in caplog.text


# -- 3: result conventions ---------------------------------------------------------------------------------------


def test_the_result_is_marked_compiled_and_lists_candidate_programs_best_first():
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona=PERSONA).compile(RewriteThenAnswer(), trainset=recent())
    assert aligned._compiled is True
    candidates = aligned.candidate_programs
    assert len(candidates) >= 2 and all({"program", "score", "persona"} <= set(c) for c in candidates)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    assert candidates[0]["score"] > candidates[-1]["score"]
    for candidate in candidates:
        program = candidate["program"]
        assert isinstance(program, RewriteThenAnswer) and program is not aligned and program._compiled
        assert program.answer.predict.signature.instructions == candidate["persona"]
        assert program.rewrite.signature.instructions == "Rewrite as a search query."
        assert not hasattr(program, "candidate_programs")  # no nesting when a result is aligned again
    best = candidates[0]["program"]
    assert best.answer.predict.signature.instructions == aligned.answer.predict.signature.instructions
    with dspy.context(lm=offline_lm()):  # a candidate is a program that runs
        assert candidates[0]["program"](question="Colour of the mug?").label == "blue"


def test_an_aligned_program_nested_in_a_larger_one_is_left_alone_by_outer_optimizers():
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona=PERSONA, iterations=1).compile(answering(),
                                                                              trainset=evidence_examples())

    class Outer(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = aligned
            self.polish = dspy.Predict("question -> note")

    assert [name for name, _ in Outer().named_predictors()] == ["polish"]  # dspy freezes a _compiled sub-module


def test_unknown_compile_keywords_are_ignored_with_one_warning(caplog):
    aligner = PersonaAligner(metric, iterations=1)
    with caplog.at_level(logging.WARNING), dspy.context(lm=offline_lm()):
        aligned = aligner.compile(answering(), trainset=evidence_examples(), num_trials=3, minibatch=False)
    warnings = [r.getMessage() for r in caplog.records if "ignores argument" in r.getMessage()]
    assert warnings == ["PersonaAligner.compile ignores argument(s) it does not use: minibatch, num_trials"]
    assert aligned._compiled


def test_num_threads_answers_in_worker_threads_with_the_callers_context_and_the_same_result():
    runs = {}
    for threads in (1, 3):
        engine = ThreadRecording()
        lm = dspy.LM("offline/threads", engine=engine, cache=False, num_retries=0)
        with dspy.context(lm=lm):  # a context LM only: workers must see it without dspy.configure
            aligned = PersonaAligner(metric, persona=PERSONA, batch_size=4).compile(
                answering(), trainset=evidence_examples(), num_threads=threads)
        runs[threads] = (aligned, engine)
    sequential, parallel = runs[1][0], runs[3][0]
    assert not any(name.startswith("persona-align") for name in runs[1][1].threads)
    assert not runs[1][1].overlapped and runs[3][1].overlapped
    assert len({name for name in runs[3][1].threads if name.startswith("persona-align")}) >= 2
    assert parallel.persona_history == sequential.persona_history  # same personas, same scores, same order
    assert parallel.lm_calls == sequential.lm_calls == len(runs[3][1].threads)  # counters reach the workers
    with pytest.raises(ValueError, match="num_threads"):
        PersonaAligner(metric, num_threads=0)


def test_seed_drives_the_sampling_of_candidates():
    def rollout_ids(**seeds) -> list[int]:
        lm = offline_lm()
        aligner = PersonaAligner(metric, persona=PERSONA, candidates_per_step=3, iterations=1, optimizer_lm=lm,
                                 stop_when_perfect=False, **seeds.pop("init", {}))
        with dspy.context(lm=offline_lm()):
            aligner.compile(answering(), trainset=evidence_examples(), **seeds)
        return [entry["kwargs"]["rollout_id"] for entry in lm.history if "rollout_id" in entry["kwargs"]]

    expected = random.Random(7)
    assert rollout_ids(seed=7) == [expected.randrange(1 << 30) for _ in range(2)]
    assert rollout_ids(init={"seed": 7}) == rollout_ids(seed=7) != rollout_ids(seed=8)
    assert PersonaAligner(metric, seed=7).get_params()["seed"] == 7


def test_better_together_passes_its_keywords_through_to_the_aligner(caplog):
    program = RewriteThenAnswer()
    program.set_lm(offline_lm())  # BetterTogether wants every predictor to have its LM
    optimizer = dspy.BetterTogether(metric=metric, p=PersonaAligner(metric, persona=PERSONA))
    with caplog.at_level(logging.WARNING):
        compiled = optimizer.compile(program, trainset=recent(), valset=recent(), strategy="p", num_threads=2,
                                     seed=3, optimizer_compile_args={"p": {"num_threads": 2, "seed": 3}})
    assert not compiled.flag_compilation_error_occurred
    assert "blue" in compiled.answer.predict.signature.instructions
    assert "ignores argument" not in caplog.text
