"""PersonaAgent's ``demos`` mode: the query's own past items reach the model as user/assistant turns."""

from __future__ import annotations

import json

import dspy
import pytest

from persona_dspy.agent.persona_agent import DEFAULT_DEMO_CHARS, PersonaAgent, default_mode
from persona_dspy.data.examples import query_examples
from persona_dspy.data.scope import MemoryScope
from persona_dspy.programs import load_program, save_program
from persona_dspy.testing.offline_lm import offline_lm


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3")


def answer_messages(lm: dspy.LM) -> list[dict]:
    return lm.history[-1]["messages"]


def test_label_tasks_default_to_demos_and_others_to_rag():
    assert default_mode("LaMP_3") == default_mode("LaMP_2N") == default_mode("LaMP_4") == "demos"
    assert default_mode("LaMP_1") == default_mode("LaMP_7") == "rag"  # items without the user's answer
    with pytest.raises(ValueError, match="needs past items with the user's answers"):
        PersonaAgent("LaMP_1", None, "demos")


def test_the_query_s_own_past_items_become_turns_most_similar_last(lamp3):
    histories, memory = lamp3
    history = histories[0]
    query = history.queries[-1]
    lm = offline_lm()
    agent = PersonaAgent("LaMP_3", memory, user_id=history.user_id, k=3)
    assert agent.mode == "demos" and agent.reasoning is False  # no invented reasoning in a demonstration
    with dspy.context(lm=lm):
        prediction = agent(query=query.input, scope=MemoryScope.for_query(history.user_id, query))
    messages = answer_messages(lm)
    assert messages[0]["role"] == "system" and agent.persona_summary in messages[0]["content"]
    turns = messages[1:-1]
    assert [m["role"] for m in turns] == ["user", "assistant"] * 3 and messages[-1]["role"] == "user"
    passages = list(prediction.passages)
    assert len(passages) == 3 and all(p.item_id in query.profile_ids for p in passages)  # its own profile only
    for passage, (user, assistant) in zip(reversed(passages), zip(turns[::2], turns[1::2], strict=True), strict=True):
        text = passage.fields["text"]
        assert text[:40] in user["content"]  # the item asked as the task's query ...
        assert len(user["content"]) <= DEFAULT_DEMO_CHARS + 400  # ... its text cut to demo_chars (+ the prompt)
        assert passage.label in assistant["content"]  # ... and its label the answer
    assert passages[0].fields["text"][:40] in turns[-2]["content"]  # the most similar item is the last turn
    assert "context" not in messages[-1]["content"]  # the query alone, under the schema's answer


def test_demos_never_cross_users_or_reach_past_the_query(lamp3):
    histories, memory = lamp3
    for history in histories:
        agent = PersonaAgent("LaMP_3", memory, user_id=history.user_id, k=8)
        for query in history.queries:
            scope = MemoryScope.for_query(history.user_id, query)
            passages, _, _ = agent._prepare(query.input, scope)
            assert {p.item_id for p in passages} <= set(query.profile_ids)
            assert all(d.answer in {"1", "2", "3", "4", "5"} for d in agent.demonstrations(passages))


def test_a_program_file_records_the_mode_and_retrieves_the_same_way(lamp3, tmp_path):
    histories, memory = lamp3
    history = histories[1]
    agent = PersonaAgent("LaMP_3", memory, user_id=history.user_id, k=4, demo_chars=120)
    with dspy.context(lm=offline_lm()):
        path = save_program(agent, tmp_path / "u.json")
        metadata = json.loads(path.read_text())["metadata"]
        assert (metadata["mode"], metadata["k"], metadata["demo_chars"]) == ("demos", 4, 120)
        loaded = load_program(path, memory)
        assert (loaded.mode, loaded.k, loaded.demo_chars) == ("demos", 4, 120)
        example = query_examples(history)[0]
        lm = offline_lm()
        with dspy.context(lm=lm):
            before = agent(**example.inputs())
            sent = answer_messages(lm)
            after = loaded(**example.inputs())
        assert [p.item_id for p in before.passages] == [p.item_id for p in after.passages]
        assert answer_messages(lm) == sent


def test_demos_set_by_an_optimizer_come_before_the_retrieved_ones(lamp3):
    histories, memory = lamp3
    history = histories[0]
    agent = PersonaAgent("LaMP_3", memory, user_id=history.user_id, k=2)
    [predictor] = agent.persona_predictors()
    predictor.demos = [dspy.Example(query="a fixed demonstration chosen by an optimizer", answer="3")]
    lm = offline_lm()
    with dspy.context(lm=lm):
        agent(**query_examples(history)[0].inputs())
    users = [m["content"] for m in answer_messages(lm) if m["role"] == "user"]
    assert len(users) == 4 and "a fixed demonstration chosen by an optimizer" in users[0]


def test_a_label_none_of_the_demonstrations_carry_is_overruled_by_their_vote(lamp3):
    from test_agent import scripted_lm

    histories, memory = lamp3
    history = histories[0]
    example = query_examples(history)[0]
    reply = "[[ ## answer ## ]]\n1\n\n[[ ## completed ## ]]"  # the first label, whatever the demonstrations say
    for check in (True, False):
        lm, _ = scripted_lm(reply)
        agent = PersonaAgent("LaMP_3", memory, user_id=history.user_id, k=5, evidence_check=check)
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            prediction = agent(**example.inputs())
        labels = [p.label for p in prediction.passages]
        assert prediction.lm_answer == "1"
        if check and "1" not in labels:  # outside the ratings of the user's similar reviews
            mean = sum(map(float, labels)) / len(labels)
            assert prediction.overruled and prediction.answer == str(int(mean + 0.5))  # their rounded mean
        else:
            assert prediction.answer == "1" and not getattr(prediction, "overruled", False)
    assert min(map(float, labels)) > 1  # the sample user's similar reviews are all rated above 1
