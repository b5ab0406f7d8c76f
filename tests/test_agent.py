"""PersonaAgent: persona as instructions, scoped memory in every mode, label mapping, semantic memory."""

from __future__ import annotations

import hashlib

import dspy
import pytest

from persona_dspy.agent import PersonaAgent, answer_text_from_response, scoped_memory_tool
from persona_dspy.examples import interaction_examples, query_examples
from persona_dspy.offline_lm import Message, Response, TextPart, Usage, offline_lm
from persona_dspy.semantic_memory import PersonaSummarizer, initial_persona
from signatures import compose_persona


@pytest.fixture(scope="module")
def lamp2n(sample_memory):
    return sample_memory("LaMP_2N")


class ScriptedEngine:
    """Answers every call with one fixed text, as a small local model might."""

    def __init__(self, text: str) -> None:
        self.text = text

    def complete(self, request) -> Response:
        return Response(id="scripted-" + hashlib.sha256(self.text.encode()).hexdigest()[:8], model="scripted",
                        message=Message.assistant([TextPart(self.text)]), finish_reason="stop",
                        usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


def test_persona_is_the_instruction_of_the_answering_predictor(lamp2n, lm):
    histories, memory = lamp2n
    a = PersonaAgent("LaMP_2N", memory, "rag", persona=compose_persona("- likes sports"))
    b = PersonaAgent("LaMP_2N", memory, "rag", persona=compose_persona("- likes sports"))
    a.persona = compose_persona("- files everything under travel")
    [predictor] = a.persona_predictors()
    assert predictor.signature.instructions == a.persona and "travel" in a.persona
    assert "travel" not in b.persona  # no shared signature class was mutated
    assert dict(a.named_predictors())["reason.program.predict"] is predictor
    copy = a.deepcopy()
    assert copy.persona == a.persona and copy.memory is memory
    with pytest.raises(ValueError, match="non-empty"):
        a.persona = "  "


def test_persona_steers_the_answer(lamp2n, lm):
    histories, memory = lamp2n
    example = query_examples(histories[0])[0]
    agent = PersonaAgent("LaMP_2N", memory, "rag", persona=compose_persona("- Preferred label: religion"))
    assert agent(**example.inputs()).answer == "religion"


def test_rag_retrieves_only_within_the_questions_scope(lamp2n, lm):
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, "rag", k=50)
    for history in histories:
        for example in query_examples(history):
            passages = agent(**example.inputs()).passages
            assert passages and {p.item_id for p in passages} <= example.scope.within_ids
        for example in interaction_examples(history, 3):
            target = history.item(example.example_id)
            for p in agent(**example.inputs()).passages:
                assert p.item_id != target.id and p.date < target.date.isoformat()


def test_react_searches_memory_through_the_scoped_tool(lamp2n, lm):
    histories, memory = lamp2n
    history = histories[0]
    agent = PersonaAgent("LaMP_2N", memory, "react", persona=initial_persona(history))
    example = query_examples(history)[0]
    prediction = agent(**example.inputs())
    assert prediction.answer in agent.spec.labels
    trajectory_calls = [h for h in lm.history if "search_user_history" in str(h.get("messages"))]
    assert trajectory_calls, "ReAct never saw the memory tool"
    agent.persona = compose_persona("- Preferred label: sports")
    react_predictor, extract_predictor = agent.persona_predictors()
    assert extract_predictor.signature.instructions == agent.persona
    assert react_predictor.signature.instructions.startswith(agent.persona)
    assert "search_user_history" in react_predictor.signature.instructions  # the tool list survives
    tool = scoped_memory_tool(memory)
    assert "no user is in scope" in tool("politics")


def test_none_mode_is_the_non_personalized_baseline(lm):
    agent = PersonaAgent("LaMP_3", None, "none")
    prediction = agent(query="What is the score of the following review? review: great strings")
    assert prediction.answer in agent.spec.labels and prediction.passages == []
    with pytest.raises(ValueError, match="needs an EpisodicMemory"):
        PersonaAgent("LaMP_3", None, "rag")
    with pytest.raises(ValueError, match="unknown mode"):
        PersonaAgent("LaMP_3", None, "telepathy")


def test_an_agent_bound_to_a_user_searches_that_user(lamp2n, lm):
    histories, memory = lamp2n
    user = histories[1].user_id
    agent = PersonaAgent("LaMP_2N", memory, "rag", user_id=user)
    passages = agent(query=histories[1].queries[0].input).passages
    user_items = {it.id for it in histories[1].items}
    assert passages and {p.item_id for p in passages} <= user_items
    with pytest.raises(ValueError, match="bound to no user"):
        PersonaAgent("LaMP_2N", memory, "rag")(query="x")


@pytest.mark.parametrize(("reply", "expected"), [
    ("[[ ## reasoning ## ]]\nhmm\n[[ ## answer ## ]]\nPolitics.\n[[ ## completed ## ]]", "politics"),
    ("The category is Style & Beauty", "style & beauty"),
    ("[[ ## answer ## ]]\nweather\n[[ ## completed ## ]]", "weather"),
])
def test_free_text_answers_are_mapped_onto_the_label_set(lamp2n, reply, expected):
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, "rag")
    with dspy.context(lm=dspy.LM("scripted/model", engine=ScriptedEngine(reply), cache=False, num_retries=0)):
        prediction = agent(**query_examples(histories[0])[0].inputs())
    assert prediction.answer == expected  # unmappable text stays as is and scores as a wrong label


def test_answer_text_from_response_forms():
    assert answer_text_from_response('{"reasoning": "x", "answer": "4"}') == "4"
    assert answer_text_from_response("[[ ## answer ## ]]\n 3 stars \n[[ ## completed ## ]]") == "3 stars"
    assert answer_text_from_response("  five ") == "five"


def test_initial_persona_reads_only_history_before_the_earliest_query(lamp2n):
    histories, _ = lamp2n
    history = next(h for h in histories if len(h.items) > len(h.shared_history()))
    later = [it for it in history.items if it not in history.shared_history()]
    lm = offline_lm()
    with dspy.context(lm=lm):
        persona = initial_persona(history, PersonaSummarizer(max_items=1000))
    prompt = str(lm.history[-1]["messages"])
    assert all(it.text[:60] not in prompt for it in later), "a query's gold item leaked into the persona prompt"
    assert history.shared_history()[-1].text[:40] in prompt
    assert persona.startswith("You are a helpful personalized assistant") and "Rules:" in persona
