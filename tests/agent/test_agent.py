"""PersonaAgent: persona as instructions, scoped memory in every mode, label mapping, semantic memory."""

from __future__ import annotations

import hashlib

import dspy
import pytest
from persona_dspy.signatures import compose_persona

from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.agent.semantic_memory import PersonaSummarizer, initial_persona
from persona_dspy.data.examples import interaction_examples, query_examples
from persona_dspy.memory.retrieval import MEMORY_TOOL_NAME, memory_search_tool
from persona_dspy.outputs.text import field_text_from_response
from persona_dspy.testing.offline_lm import Message, Response, TextPart, Usage, offline_lm


@pytest.fixture(scope="module")
def lamp2n(sample_memory):
    return sample_memory("LaMP_2N")


class ScriptedEngine:
    """Answers with fixed texts, as a small local model might: the first text first, then always the last one."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls = 0

    def complete(self, request) -> Response:
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        return Response(id=f"scripted-{self.calls}-" + hashlib.sha256(text.encode()).hexdigest()[:8],
                        model="scripted", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


def scripted_lm(*texts: str) -> tuple[dspy.LM, ScriptedEngine]:
    engine = ScriptedEngine(*texts)
    return dspy.LM("scripted/model", engine=engine, cache=False, num_retries=0), engine


FINISH_STEP = ("[[ ## next_thought ## ]]\nI know enough.\n[[ ## next_tool_name ## ]]\nfinish\n"
               "[[ ## next_tool_args ## ]]\n{}\n[[ ## completed ## ]]")


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
    assert MEMORY_TOOL_NAME in react_predictor.signature.instructions  # the tool list survives
    tool = memory_search_tool(memory)
    assert tool.__name__ == MEMORY_TOOL_NAME and "no user is in scope" in tool("politics")
    bound = memory_search_tool(memory, example.scope, k=2)
    assert bound.__doc__ == tool.__doc__ and "no user is in scope" not in bound("politics")


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
    with dspy.context(lm=scripted_lm(reply)[0]):
        prediction = agent(**query_examples(histories[0])[0].inputs())
    assert prediction.answer == expected  # unmappable text stays as is and scores as a wrong label


def test_a_free_text_answer_costs_one_call_and_keeps_the_models_words(lamp2n):
    # dspy's ChatAdapter would ask again through its JSON adapter: a second call, whose reply replaced the first
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, "rag")
    lm, engine = scripted_lm("The category is Politics.", '{"answer": "Sports!"}')
    with dspy.context(lm=lm):
        prediction = agent(**query_examples(histories[0])[0].inputs())
    assert engine.calls == 1 and prediction.raw_answer == "The category is Politics."
    assert prediction.answer == "politics" and prediction.unparsed  # mapped, and said so for the counts


def test_a_configured_adapter_is_respected(lamp2n):
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, "rag")
    lm, engine = scripted_lm("The category is Politics.", '{"answer": "Sports!"}')
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):  # the user's choice, JSON retry included
        prediction = agent(**query_examples(histories[0])[0].inputs())
    assert engine.calls == 2 and prediction.answer == "sports"


def test_react_maps_a_free_text_answer_but_not_a_broken_tool_step(lamp2n):
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, "react")
    inputs = query_examples(histories[0])[0].inputs()
    lm, engine = scripted_lm(FINISH_STEP, "The category is Politics.")
    with dspy.context(lm=lm):
        prediction = agent(**inputs)
    assert engine.calls == 2 and prediction.answer == "politics"  # one tool step, one answer: no retry
    lm, engine = scripted_lm("The category is Politics.")  # as a tool step this says nothing about the tool
    with dspy.context(lm=lm):
        broken = agent(**inputs)
    assert broken.answer == "" and broken.invalid == "unparsable tool step"  # scored invalid; the run goes on
    assert engine.calls == 2  # the step kept ChatAdapter's JSON retry


def test_field_text_from_response_forms():
    assert field_text_from_response('{"reasoning": "x", "answer": "4"}', "answer") == "4"
    assert field_text_from_response("[[ ## answer ## ]]\n 3 stars \n[[ ## completed ## ]]", "answer") == "3 stars"
    assert field_text_from_response("  five ", "answer") == "five"
    # a JSON reply cut off by max_tokens keeps the field's text up to the cut
    assert field_text_from_response('{"feedback": "The user prefers \\"rock\\" and', "feedback") == (
        'The user prefers "rock" and')


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


@pytest.mark.parametrize("mode", ["rag", "react", "none"])
def test_acall_asyncify_and_streamify_answer_like_a_call(lamp2n, lm, mode):
    import asyncio

    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory, mode, persona=compose_persona("- Preferred label: religion"))
    inputs = query_examples(histories[0])[0].inputs()
    expected = agent(**inputs)

    async def run():
        awaited = await agent.acall(**inputs)
        wrapped = await dspy.asyncify(agent)(**inputs)
        streamed = [item async for item in dspy.streamify(agent)(**inputs)]
        return awaited, wrapped, streamed[-1]

    with dspy.context(lm=lm):
        awaited, wrapped, final = asyncio.run(run())
    for prediction in (awaited, wrapped, final):
        assert isinstance(prediction, dspy.Prediction)
        assert (prediction.answer, prediction.raw_answer) == (expected.answer, expected.raw_answer)
