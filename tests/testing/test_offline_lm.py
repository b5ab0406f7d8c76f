"""The offline stand-in answers any DSPy program validly, deterministically and thread-safely."""

import asyncio
import enum
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import dspy
import pydantic
import pytest
from persona_dspy.signatures.labels import label_list
from persona_dspy.signatures.persona import PersonaSummary, PersonaUpdate, TextualLoss
from persona_dspy.signatures.task_signatures import TASK_SIGNATURES, task_signature

from persona_dspy.lm.providers import OFFLINE_MODEL
from persona_dspy.lm.report import describe_lm, is_offline
from persona_dspy.lm.usage import LMUsage
from persona_dspy.testing.offline_lm import OfflineEngine, answer_messages, offline_lm

ADAPTERS = {"chat": dspy.ChatAdapter, "json": dspy.JSONAdapter}
MODULES = {"predict": dspy.Predict, "cot": dspy.ChainOfThought}
CONTEXT = {
    "LaMP_1": "The author wrote about graph neural networks [2] and [2] again.",
    "LaMP_2M": "A funny movie. tag: comedy\nAnother one. tag: comedy\nSpace war. tag: sci-fi",
    "LaMP_2N": "Election news. category: politics\nMatch report. category: sports\ncategory: politics",
    "LaMP_3": "Loved it. score: 5\nFine. score: 4\nGreat value. score: 5",
}
QUERY = "Generate a headline for the following article: The city council approved a new bike lane network today"


@pytest.fixture
def stand_in():
    """A fresh stand-in, not made current (unlike conftest's ``lm``): each test passes it where it is used."""
    return offline_lm()


def run(lm, module, adapter="chat", **inputs):
    with dspy.context(lm=lm, adapter=ADAPTERS[adapter]()):
        return module(**inputs)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("task", sorted(TASK_SIGNATURES))
def test_every_task_gets_a_valid_answer(stand_in, task, kind, adapter):
    pred = run(stand_in, MODULES[kind](task_signature(task)), adapter, query=QUERY, context=CONTEXT.get(task, "none"))
    labels = label_list(task)
    if labels:
        assert pred.answer in labels
    else:
        assert pred.answer == "The city council approved a new bike lane"  # its first eight words
    if kind == "cot":
        assert pred.reasoning.startswith("Offline stand-in, not a model")


@pytest.mark.parametrize("task", sorted(CONTEXT))
def test_labels_follow_the_evidence(stand_in, task):
    expected = {"LaMP_1": "[2]", "LaMP_2M": "comedy", "LaMP_2N": "politics", "LaMP_3": "5"}[task]
    assert run(stand_in, dspy.Predict(task_signature(task)), query="x", context=CONTEXT[task]).answer == expected


def test_no_evidence_gives_the_first_label(stand_in):
    pred = run(stand_in, dspy.Predict(task_signature("LaMP_2N")), query="x", context="nothing relevant")
    assert pred.answer == "travel"


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_same_input_same_output(adapter):
    first, second = offline_lm(), offline_lm()
    sig = task_signature("LaMP_2M")
    inputs = {"query": "A heist film with a twist", "context": "tag: comedy tag: action tag: comedy tag: action"}
    a = run(first, dspy.ChainOfThought(sig), adapter, **inputs)
    b = run(second, dspy.ChainOfThought(sig), adapter, **inputs)
    c = run(first, dspy.ChainOfThought(sig), adapter, **inputs)
    assert a.toDict() == b.toDict() == c.toDict()
    assert first.history[-1]["outputs"] == second.history[-1]["outputs"]


def with_persona(sig, persona):
    pred = dspy.Predict(sig)
    pred.signature = pred.signature.with_instructions(f"{sig.instructions}\n\nPersona:\n{persona}")
    return pred


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_preferred_label_line_beats_the_evidence(stand_in, adapter):
    pred = with_persona(task_signature("LaMP_2M"), "- Likes long films.\n- Preferred label: dystopia")
    assert run(stand_in, pred, adapter, query="x", context=CONTEXT["LaMP_2M"]).answer == "dystopia"


def test_prefers_phrase_and_rating(stand_in):
    pred = with_persona(task_signature("LaMP_3"), "This user prefers 2 stars for anything mediocre.")
    assert run(stand_in, pred, query="meh", context="score: 5 score: 5").answer == "2"


def test_several_preferences_are_ranked_by_evidence(stand_in):
    pred = with_persona(task_signature("LaMP_2M"), "Preferred label: romance\nPreferred label: comedy")
    assert run(stand_in, pred, query="x", context="tag: romance tag: romance tag: comedy").answer == "romance"
    assert run(stand_in, pred, query="x", context="nothing").answer == "comedy"  # no evidence: the latest statement


def test_textual_loss_names_expected_and_produced(stand_in):
    loss = dspy.Predict(TextualLoss)
    wrong = run(stand_in, loss, program_inputs="query: q", expected_outputs="comedy", produced_outputs="action",
                persona="- likes films")
    assert wrong.feedback.startswith('Expected "comedy" but answered "action"')
    right = run(stand_in, loss, program_inputs="query: q", expected_outputs="Comedy", produced_outputs="comedy",
                persona="")
    assert "correctly" in right.feedback


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_persona_update_closes_the_loop(stand_in, adapter):
    persona = "Rules:\n- Answer with one tag.\nPreferences:\n- Enjoys films."
    feedback = ('Expected "comedy" but answered "action"; the persona missed it.\n'
                'Expected "comedy" but answered "sci-fi"; again.\nExpected "romance" but answered "action".')
    new = run(stand_in, dspy.Predict(PersonaUpdate), adapter, persona=persona, feedback=feedback,
              max_words=40).new_persona
    assert new.startswith(persona) and new.endswith("- Preferred label: comedy")
    tagger = with_persona(task_signature("LaMP_2M"), new)
    assert run(stand_in, tagger, adapter, query="x", context="tag: action tag: action").answer == "comedy"


def test_persona_update_respects_max_words_and_keeps_the_rules(stand_in):
    persona = "Rules:\n- Answer with one tag.\n- Preferred label: drama\n- Preferred label: action\n- Likes "
    persona += "x " * 30
    new = run(stand_in, dspy.Predict(PersonaUpdate), persona=persona,
              feedback='Expected "comedy" but answered "action"', max_words=15).new_persona
    assert len(new.split()) <= 15
    assert new.startswith("Rules:\n- Answer with one tag.") and new.endswith("- Preferred label: comedy")


def test_persona_update_without_errors_keeps_the_persona(stand_in):
    new = run(stand_in, dspy.Predict(PersonaUpdate), persona="- Enjoys films.", feedback="Answered correctly.",
              max_words=50)
    assert new.new_persona == "- Enjoys films."


def test_persona_summary_extracts_the_dominant_label(stand_in):
    history = "A space movie. tag: sci-fi\nA funny film. tag: comedy\nAnother funny film. tag: comedy"
    persona = run(stand_in, dspy.Predict(PersonaSummary), history=history, max_words=60).persona
    assert "Preferred label: comedy" in persona and persona.startswith("Preferences:")


def search_memory(query: str, k: int = 3) -> str:
    """Search the user's memory for passages about the query."""
    search_memory.calls.append(query)
    return "tag: comedy. tag: comedy. tag: action."


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_react_uses_the_tool_once_then_finishes(stand_in, adapter):
    search_memory.calls = []
    agent = dspy.ReAct(task_signature("LaMP_2M"), tools=[search_memory], max_iters=5)
    pred = run(stand_in, agent, adapter, query="description: a funny heist film", context="")
    assert search_memory.calls == ["a funny heist film"]
    assert pred.trajectory["tool_name_0"] == "search_memory"
    assert pred.trajectory["tool_name_1"] == "finish"
    assert pred.answer == "comedy"  # the observation is evidence for the extract step


class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Card(pydantic.BaseModel):
    title: str
    stars: int
    tags: list[str]


class Everything(dspy.Signature):
    """Fill every field."""

    question: str = dspy.InputField()
    count: int = dspy.OutputField()
    score: float = dspy.OutputField()
    flag: bool = dspy.OutputField()
    words: list[str] = dspy.OutputField()
    extra: dict[str, Any] = dspy.OutputField()
    card: Card = dspy.OutputField()
    mood: Mood = dspy.OutputField()
    maybe: str | None = dspy.OutputField()
    level: Literal[1, 2, 3] = dspy.OutputField()


@pytest.mark.parametrize("adapter", ["chat", "json", "xml"])
def test_any_signature_parses(stand_in, adapter):
    adapters = {**ADAPTERS, "xml": dspy.XMLAdapter}
    with dspy.context(lm=stand_in, adapter=adapters[adapter]()):
        pred = dspy.Predict(Everything)(question="What is in the box today?")
    assert isinstance(pred.count, int) and isinstance(pred.score, float) and pred.flag is True
    assert pred.words == ["What is in the box today?"]
    assert isinstance(pred.card, Card) and pred.mood is Mood.HAPPY and pred.level == 1


def test_plain_calls_and_async(stand_in):
    assert stand_in("Tell me something about bikes") == ["Tell me something about bikes"]
    with dspy.context(lm=stand_in):
        pred = asyncio.run(dspy.Predict(task_signature("LaMP_3")).acall(query="x", context="score: 4"))
    assert pred.answer == "4"


def test_threads_get_the_same_answers(stand_in):
    sig = task_signature("LaMP_2N")
    contexts = [f"category: {c}" for c in label_list("LaMP_2N")] * 3

    def one(context):
        with dspy.context(lm=stand_in):
            return dspy.ChainOfThought(sig)(query="x", context=context).answer

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, contexts))
    assert answers == [c.removeprefix("category: ") for c in contexts]
    assert stand_in.engine.calls == len(contexts)


def test_identity_is_recorded(stand_in):
    assert stand_in.model == OFFLINE_MODEL == "offline/stand-in" and is_offline(stand_in)
    info = describe_lm(stand_in)
    assert info["model"] == OFFLINE_MODEL and info["engine"] == "offline" and info["offline"] is True
    assert "stand-in" in OfflineEngine.__doc__ and "never a model" in OfflineEngine.__doc__


def test_offline_lm_state_round_trips(stand_in):
    loaded = dspy.LM.load_state(stand_in.dump_state(), allow_custom_lm_class=True)
    assert isinstance(loaded.engine, OfflineEngine) and loaded.model == OFFLINE_MODEL


def test_answer_messages_reads_openai_style_content_parts():
    sig = task_signature("LaMP_3")
    messages = dspy.ChatAdapter().format(sig, demos=[], inputs={"query": "x", "context": "score: 3"})
    messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"]}]
    text = answer_messages(messages)
    assert text == "[[ ## answer ## ]]\n3\n\n[[ ## completed ## ]]"


def test_usage_callback_counts_calls_and_tokens():
    usage = LMUsage()
    lm = offline_lm(callbacks=[usage])
    with dspy.context(lm=lm, callbacks=[usage]):  # registered twice: each call still counts once
        for _ in range(3):
            dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 2")
    snap = usage.snapshot()
    assert snap["calls"] == 3 and snap["errors"] == 0 and snap["unmetered_calls"] == 0
    # the stand-in counts words: "[[ ## answer ## ]] 2 [[ ## completed ## ]]" is 11
    assert snap["prompt_tokens"] > 0 and snap["completion_tokens"] == 3 * 11
    assert snap["by_model"] == {OFFLINE_MODEL: 3}
    usage.reset()
    assert usage.snapshot()["calls"] == 0


def test_usage_callback_is_thread_safe():
    usage = LMUsage()
    lm = offline_lm(callbacks=[usage])

    def one(i):
        with dspy.context(lm=lm):
            return dspy.Predict(task_signature("LaMP_3"))(query=str(i), context="score: 1").answer

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(one, range(40))) == {"1"}
    assert usage.calls == 40 and usage.unmetered_calls == 0 and usage.completion_tokens == 40 * 11
