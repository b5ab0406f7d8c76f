"""Programs the project did not write, aligned by PersonaAligner and by GEPA with the textual loss.

Each program answers ``label`` from a ``question`` (no ``query``, no ``answer``). The user always answers "blue"
while the evidence says "red", so only a persona that learned the preference answers right: the predictor that
carries the persona must change, the others must not.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from pathlib import Path

import dspy
import pytest
from persona_dspy.optimizers.persona_aligner import PersonaAligner
from persona_dspy.optimizers.persona_gepa import persona_gepa
from persona_dspy.optimizers.persona_predictors import PersonaPredictors, persona_predictors
from persona_dspy.optimizers.textual_loss import MetricError, TextualLossMetric
from test_persona_aligner import Recording

from persona_dspy.persona.guard import GuardedInstructionProposer, PersonaGuard
from persona_dspy.testing.offline_lm import OfflineEngine, Response, offline_lm

PERSONA = "You answer as this particular user would, in their own words."
LABEL = "label: Literal['red', 'green', 'blue']"
REWRITE = "Rewrite the question as a short search query."
NOTES = "Catalogue notes: red is the colour everyone picks; red, red and red again."


def metric(example, prediction, trace=None, pred_name=None, pred_trace=None) -> float:
    return float(getattr(prediction, "label", None) == example.label)


def recent(n: int = 3) -> list[dspy.Example]:
    return [dspy.Example(question=f"Which colour should item {i} of the evening set have?", label="blue")
            .with_inputs("question") for i in range(n)]


def search_notes(topic: str) -> str:
    """Look up the shop's catalogue notes on a topic."""
    return NOTES


class RetrieveThenAnswer(dspy.Module):
    """Two predictors: a query rewriter (no persona) and the answering step (the persona)."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrite = dspy.Predict(dspy.Signature("question -> search_query", REWRITE))
        self.answer = dspy.ChainOfThought(dspy.Signature(f"question, passages -> {LABEL}", PERSONA))

    def forward(self, question: str) -> dspy.Prediction:
        query = self.rewrite(question=question).search_query
        return self.answer(question=question, passages=f"{query}: {NOTES}")


def react_program() -> dspy.ReAct:
    return dspy.ReAct(dspy.Signature(f"question -> {LABEL}", PERSONA), tools=[search_notes], max_iters=3)


def instructions(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def recording_lm() -> tuple[dspy.LM, Recording]:
    engine = Recording()
    return dspy.LM("offline/recording", engine=engine, cache=False, num_retries=0), engine


def gepa_run(program: dspy.Module, reflection_lm: dspy.LM | None = None, **kwargs) -> tuple[dspy.Module, dspy.GEPA]:
    gepa = persona_gepa(program, metric, reflection_lm=reflection_lm or offline_lm(), max_metric_calls=30,
                        reflection_minibatch_size=3, seed=0, **kwargs)
    with dspy.context(lm=offline_lm()):
        return gepa.compile(program, trainset=recent(), valset=recent()), gepa


# -- item 1: any field names -------------------------------------------------------------------------------------


def test_chain_of_thought_question_label_is_aligned_and_the_loss_shows_fields_by_name():
    program = dspy.ChainOfThought("question -> label")
    optimizer_lm, engine = recording_lm()
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, optimizer_lm=optimizer_lm, iterations=1).compile(program, trainset=recent())
    assert aligned.alignment["input_fields"] == ["question"] and aligned.alignment["output_fields"] == ["label"]
    loss_prompts = [p for p in engine.prompts if "`produced_outputs`" in p]
    assert len(loss_prompts) == 3
    assert "question: Which colour should item" in loss_prompts[0]  # the input, by its own name
    assert "label: blue" in loss_prompts[0] and "label: Which colour" in loss_prompts[0]  # expected vs produced


def test_several_outputs_are_compared_by_name():
    example = dspy.Example(question="q", label="blue", confidence="high", example_id="e1").with_inputs("question")
    prediction = dspy.Prediction(reasoning="r", label="red", confidence="low")
    inputs = TextualLossMetric(metric).loss_inputs(example, prediction, "- likes blue")
    assert inputs["expected_outputs"] == "label: blue\nconfidence: high"
    assert inputs["produced_outputs"] == "label: red\nconfidence: low"
    assert inputs["program_inputs"] == "question: q"
    failed = TextualLossMetric(metric, declared_outputs=["label"]).loss_inputs(example, None, "p")  # no prediction
    assert failed["expected_outputs"] == "label: blue" and failed["produced_outputs"].startswith("(no answer")


def test_unclear_fields_fail_before_any_lm_call_and_can_be_named():
    program = dspy.Predict("question -> verdict")
    trainset = [dspy.Example(question="q", label="blue").with_inputs("question")]  # no label among the outputs
    lm = offline_lm()
    with dspy.context(lm=lm), pytest.raises(ValueError, match="pass output_fields"):
        PersonaAligner(metric).compile(program, trainset=trainset)
    assert lm.engine.calls == 0
    with dspy.context(lm=lm):
        aligned = PersonaAligner(lambda ex, pred, trace=None: 0.0, iterations=1, output_fields=["verdict"]).compile(
            program, trainset=[dspy.Example(question="q", verdict="yes").with_inputs("question")])
    assert aligned.alignment["output_fields"] == ["verdict"]


def test_chain_of_thought_learns_the_users_label_with_both_optimizers():
    program = dspy.ChainOfThought(f"question -> {LABEL}")
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric).compile(program, trainset=recent())
    assert aligned.alignment["improved"] and aligned.alignment["best_score"] == 1.0
    assert "blue" in aligned.predict.signature.instructions.split("User summary:")[1]
    evolved, gepa = gepa_run(program)
    assert "blue" in evolved.predict.signature.instructions.split("User summary:")[1]
    assert gepa.persona_proposer.proposals >= 1 and not gepa.persona_loss.failures


# -- item 2 and 5: several predictors, only the persona's change ----------------------------------------------------


def test_retrieve_then_answer_changes_only_the_answering_step():
    program = RetrieveThenAnswer()
    before = instructions(program)
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona=PERSONA).compile(program, trainset=recent())
    reflection_lm, reflections = recording_lm()
    evolved, gepa = gepa_run(program, reflection_lm, persona=PERSONA)
    assert reflections.prompts and not any(REWRITE in prompt for prompt in reflections.prompts)  # never reflected on
    for result in (aligned, evolved):
        after = instructions(result)
        assert after["rewrite"] == before["rewrite"] == REWRITE
        assert after["answer.predict"].startswith(PERSONA + "\n\nUser summary:\n") and "blue" in after["answer.predict"]
    assert aligned.alignment["persona_predictors"] == ["answer.predict"] and aligned.alignment["improved"]
    assert gepa.persona_proposer.components == ["answer.predict"]


def test_without_a_persona_every_predictor_keeps_its_own_instructions(caplog):
    """The old bug: the first predictor's instructions were written into both."""
    program = RetrieveThenAnswer()
    with caplog.at_level(logging.WARNING), dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric).compile(program, trainset=recent())
    assert "all 2 predictors carry the persona" in caplog.text
    after = instructions(aligned)
    assert after["rewrite"].startswith(REWRITE) and PERSONA not in after["rewrite"]
    assert after["answer.predict"].startswith(PERSONA) and REWRITE not in after["answer.predict"]


def test_predictors_can_be_chosen_by_name_or_predicate():
    program = RetrieveThenAnswer()
    assert [n for n, _ in persona_predictors(program, ["answer.predict"])] == ["answer.predict"]
    assert [n for n, _ in persona_predictors(program, lambda name, p: "label" in p.signature.output_fields)] == [
        "answer.predict"]
    assert [n for n, _ in persona_predictors(program, persona=PERSONA)] == ["answer.predict"]
    with pytest.raises(ValueError, match="unknown predictor"):
        persona_predictors(program, ["answer"])
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona_predictors=["answer.predict"]).compile(program, trainset=recent())
    assert instructions(aligned)["rewrite"] == REWRITE and "blue" in instructions(aligned)["answer.predict"]


def test_react_keeps_its_tool_listing_and_extract_step():
    program = react_program()
    before = instructions(program)
    assert "(1) search_notes" in before["react"]
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona=PERSONA).compile(program, trainset=recent())
    evolved, _ = gepa_run(program, persona=PERSONA)
    for result in (aligned, evolved):
        after = instructions(result)
        assert after["extract.predict"].startswith(PERSONA + "\n\nUser summary:\n")
        assert "search_notes" not in after["extract.predict"]  # the tool listing never reaches the extract step
        assert "blue" in after["extract.predict"].split("User summary:")[1]
        assert after["react"].startswith(before["react"])  # role and tool listing verbatim; a summary may follow
    assert aligned.alignment["improved"]


def test_react_with_only_the_extract_step_chosen_leaves_the_tool_loop_alone():
    program = react_program()
    before = instructions(program)
    with dspy.context(lm=offline_lm()):
        aligned = PersonaAligner(metric, persona_predictors=["extract.predict"]).compile(program, trainset=recent())
    evolved, _ = gepa_run(program, persona_predictors=["extract.predict"])
    for result in (aligned, evolved):
        assert instructions(result)["react"] == before["react"]
        assert "blue" in instructions(result)["extract.predict"]


# -- item 3: GEPA and the feedback metric --------------------------------------------------------------------------


def test_the_proposer_and_selector_never_touch_other_predictors():
    guards = PersonaPredictors(RetrieveThenAnswer(), persona=PERSONA).guards
    proposer = GuardedInstructionProposer(guards)
    lm = offline_lm()
    with dspy.context(lm=lm):
        assert proposer({"rewrite": REWRITE, "answer.predict": PERSONA}, {"rewrite": []}, ["rewrite"]) == {}
    assert lm.engine.calls == 0
    selector = proposer.component_selector()
    candidate = {"rewrite": REWRITE, "answer.predict": PERSONA}
    assert [selector(None, [], [], 0, candidate) for _ in range(3)] == [["answer.predict"]] * 3


def test_plain_gepa_with_the_textual_loss_reflects_on_any_field_names():
    program = dspy.ChainOfThought(f"question -> {LABEL}")
    loss = TextualLossMetric(metric)
    reflection_lm, engine = recording_lm()
    gepa = dspy.GEPA(metric=loss, reflection_lm=reflection_lm, max_metric_calls=12, reflection_minibatch_size=3,
                     seed=0, instruction_proposer=GuardedInstructionProposer(PersonaGuard()))
    with dspy.context(lm=offline_lm()):
        evolved = gepa.compile(program, trainset=recent(), valset=recent())
    assert not loss.failures and engine.prompts  # it reflected, on feedback that names the fields
    assert any('Expected \\"label: blue\\" but answered \\"label: red\\"' in p for p in engine.prompts)
    assert evolved.predict.signature.instructions != program.predict.signature.instructions


class FailingFeedback(OfflineEngine):
    """The stand-in, except that every feedback request fails (a broken loss LM)."""

    def complete(self, request) -> Response:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system or [])
        if "`feedback`" in system:
            raise ConnectionError("loss LM down")
        return super().complete(request)


def test_a_failing_feedback_metric_is_raised_not_swallowed():
    program = dspy.ChainOfThought(f"question -> {LABEL}")
    broken = dspy.LM("offline/broken", engine=FailingFeedback(), cache=False, num_retries=0)
    gepa = persona_gepa(program, metric, reflection_lm=offline_lm(), loss_lm=broken, max_metric_calls=30,
                        reflection_minibatch_size=3, seed=0)
    with dspy.context(lm=offline_lm()), pytest.raises(MetricError, match="loss LM down"):
        gepa.compile(program, trainset=recent(), valset=recent())
    loss = TextualLossMetric(metric, lm=broken)  # plain GEPA: recorded, and raised on request
    with dspy.context(lm=offline_lm()):
        dspy.GEPA(metric=loss, reflection_lm=offline_lm(), max_metric_calls=12, reflection_minibatch_size=3,
                  seed=0).compile(program, trainset=recent(), valset=recent())
    assert loss.failures and "loss LM down" in loss.failures[0]["error"]
    with pytest.raises(MetricError):
        loss.raise_failures()


# -- item 4: DSPy conventions -----------------------------------------------------------------------------------------


def test_compile_signature_and_params_follow_dspy():
    params = inspect.signature(PersonaAligner.compile).parameters
    assert list(params)[:5] == ["self", "student", "trainset", "teacher", "valset"]
    assert params["trainset"].kind is inspect.Parameter.KEYWORD_ONLY and params["teacher"].default is None
    aligner = PersonaAligner(metric, task_lm=offline_lm(), optimizer_lm=offline_lm(),
                             persona_predictors=lambda name, p: True)
    assert json.loads(json.dumps(aligner.get_params()))["task_lm"] == "offline/stand-in"
    with pytest.raises(ValueError, match="teacher"):
        aligner.compile(dspy.Predict("question -> label"), trainset=recent(), teacher=dspy.Predict("question -> label"))
    assert {"num_threads", "seed"} <= set(inspect.signature(PersonaAligner.compile).parameters)  # BetterTogether


def test_the_aligner_runs_under_better_together():
    program = RetrieveThenAnswer()
    program.set_lm(offline_lm())  # BetterTogether wants every predictor to have its LM; none is configured
    optimizer = dspy.BetterTogether(metric=metric, p=PersonaAligner(metric, persona=PERSONA))
    compiled = optimizer.compile(program, trainset=recent(), valset=recent(), strategy="p")
    assert not compiled.flag_compilation_error_occurred
    assert compiled.candidate_programs[0]["score"] > compiled.candidate_programs[-1]["score"]
    assert instructions(compiled)["rewrite"] == REWRITE and "blue" in instructions(compiled)["answer.predict"]


def test_persona_predictors_write_one_summary_behind_each_fixed_part():
    program = RetrieveThenAnswer()
    access = PersonaPredictors(program, ["rewrite", "answer.predict"])
    access.set(program, access.guard.template.compose("- likes blue"))
    assert access.summaries(program) == {"rewrite": "- likes blue", "answer.predict": "- likes blue"}
    assert instructions(program)["rewrite"] == f"{REWRITE}\n\nUser summary:\n- likes blue"


# -- the README's snippet --------------------------------------------------------------------------------------------


def readme_blocks(heading: str) -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_snippet_aligns_a_users_own_program(capsys, monkeypatch):
    monkeypatch.setenv("PERSONA_DSPY_LM", "offline")  # what build_lm() in the snippet builds here
    [first] = readme_blocks("## Align your own DSPy program")
    assert len([line for line in first.strip().splitlines() if line.strip()]) <= 12
    namespace: dict = {}
    with dspy.context(lm=offline_lm()):
        exec(first, namespace)  # noqa: S102 - the README's own code, exactly as a user would paste it
        learned = namespace["aligned"].predict.signature.instructions
        assert capsys.readouterr().out.strip() == learned.strip()
    assert learned.startswith(namespace["PERSONA"]) and "blue" in learned.split("User summary:")[1]


def test_the_docs_gepa_snippet_evolves_only_the_persona_predictor(monkeypatch):
    monkeypatch.setenv("PERSONA_DSPY_LM", "offline")
    text = (Path(__file__).resolve().parents[2] / "docs" / "aligner.md").read_text(encoding="utf-8")
    aligner, gepa = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}
    with dspy.context(lm=offline_lm()):
        exec(aligner, namespace)  # noqa: S102 - the page's own code, as a user would paste it
        exec(gepa, namespace)  # noqa: S102
    evolved, fresh = namespace["evolved"], namespace["Recommend"]()
    assert evolved.rewrite.signature.instructions == fresh.rewrite.signature.instructions
    assert "comedy" in evolved.answer.predict.signature.instructions.split("User summary:")[1]
