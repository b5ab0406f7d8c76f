"""The client's work per LM call: counted on the LM, nothing redone per iteration, the same answers as before.

"Before" is emulated in the same run: LiteLLM instead of the native engine (``PERSONA_DSPY_ENGINE=litellm``), a
search per answer instead of one per interaction, a signature built per persona assignment and an answer program
built from scratch per agent. A compile must send the
scripted server exactly the same requests both ways, and end with the same personas and scores.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import LMError
from loopback_server import loopback_fixture
from persona_dspy.signatures.task_signatures import task_signature

from persona_dspy.agent import persona_agent
from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.jobs import alignment
from persona_dspy.jobs.alignment import align_user
from persona_dspy.lm import config as lm_module
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.usage import ACTIVE_KEY, METER, LMUsage, counting
from persona_dspy.testing.offline_lm import offline_lm

server = loopback_fixture()


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3")


def fresh_answer_program(task: str, reasoning: bool, demos: bool = False) -> dspy.Module:
    """The answer program built from scratch for every agent, as before."""
    rationale = dspy.OutputField(desc="${reasoning}", max_length=persona_agent.REASONING_MAX_CHARS)
    signature = task_signature(task).delete("context") if demos else task_signature(task)
    return dspy.ChainOfThought(signature, rationale_field=rationale) if reasoning else dspy.Predict(signature)


def _align(history, memory, lm):
    with dspy.context(lm=lm, adapter=default_adapter()):
        return align_user(history, memory, stop_when_perfect=False)


def test_a_compile_sends_the_same_requests_as_before(lamp3, server, monkeypatch):
    histories, memory = lamp3
    history = histories[0]

    server.reset()
    after = _align(history, memory, build_lm("openai/test-model", api_base=server.api_base, num_retries=0))
    sent_after = [(r["messages"], r["max_tokens"]) for r in server.stats()["requests"]]

    monkeypatch.setenv(lm_module.ENV_ENGINE, "litellm")
    monkeypatch.setattr(alignment, "searches_reused", contextlib.nullcontext)
    monkeypatch.setattr(persona_agent.PersonaReasoning, "_with_instructions",
                        lambda self, signature, instructions: signature.with_instructions(instructions))
    monkeypatch.setattr(persona_agent, "_answer_program", fresh_answer_program)
    monkeypatch.setattr(PersonaAgent, "retrieve_ahead", lambda self, questions: None)
    monkeypatch.setattr(PersonaAgent, "_guard", lambda self, text: self.persona_guard.apply(
        text, fallback=self.persona_guard.summary(self.reason.persona)))
    server.reset()
    before = _align(history, memory, build_lm("openai/test-model", api_base=server.api_base, num_retries=0))
    sent_before = [(r["messages"], r["max_tokens"]) for r in server.stats()["requests"]]

    assert after.persona_history == before.persona_history and after.persona == before.persona
    assert after.alignment["best_score"] == before.alignment["best_score"]
    calls = after.alignment["lm_usage"]["calls"]
    assert calls == before.alignment["lm_usage"]["calls"] == len(sent_after) - 1 > 3  # + the initial persona
    assert server.stats()["answered"] == len(sent_before)  # the log holds every request
    assert sent_after == sent_before


def test_each_interaction_is_retrieved_once_per_compile(lamp3, monkeypatch):
    from persona_dspy.memory import retrieval

    histories, memory = lamp3
    searches, asked = [], []
    original, scoped = type(memory).search, retrieval.search_scope

    def search(self, user_id, query, *args, **kwargs):
        searches.append((user_id, query))
        return original(self, user_id, query, *args, **kwargs)

    def search_scope(*args, **kwargs):
        asked.append(args[2])
        return scoped(*args, **kwargs)

    monkeypatch.setattr(type(memory), "search", search)
    monkeypatch.setattr(retrieval, "search_scope", search_scope)
    _align(histories[0], memory, offline_lm())
    # retrieved up front, then asked again by every answer: the store is searched once per interaction
    assert len(asked) > 3 and len(searches) == len(set(searches)) == 3


def test_a_persona_text_builds_its_signature_once(lamp3):
    _, memory = lamp3
    agent = PersonaAgent("LaMP_3", memory)
    predictor = agent.persona_predictors()[0]
    agent.persona = "- Rates most products 5."
    rated = predictor.signature
    agent.persona = "- Rates kitchen tools low."
    low = predictor.signature
    assert low is not rated and low.instructions == agent.persona
    agent.persona = "- Rates most products 5."
    assert predictor.signature is rated
    agent.persona = "- Rates kitchen tools low."
    assert predictor.signature is low
    predictor.signature = task_signature("LaMP_3").with_instructions("set from outside")  # e.g. dspy's load_state
    agent.persona = "- Rates most products 5."
    assert predictor.signature is not rated and predictor.signature.instructions == rated.instructions


def test_counting_wakes_no_callback_per_module_and_is_exact_under_threads():
    usage, outer = LMUsage(), LMUsage()
    lm = build_lm("offline")
    assert METER in lm.callbacks  # every LM the package builds carries the meter

    def one(i):
        with dspy.context(lm=lm), usage.counting():
            assert dspy.settings.get("callbacks") == []  # nothing installed in the context
            return dspy.Predict(task_signature("LaMP_3"))(query=str(i), context="score: 2").answer

    with counting(outer):
        contexts = [contextvars.copy_context() for _ in range(40)]  # taken here, as compile's runner does
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert set(pool.map(lambda i: contexts[i].run(one, i), range(40))) == {"2"}
    assert usage.calls == 40 and usage.unmetered_calls == 0 and usage.completion_tokens == 40 * 11
    assert outer.calls == 40  # nested: every enclosing counter counts
    assert dspy.settings.get(ACTIVE_KEY) is None


def test_a_call_seen_twice_counts_once_and_errors_count():
    usage = LMUsage()
    lm = offline_lm(callbacks=[usage])  # on the LM and active in the context
    with dspy.context(lm=lm), usage.counting(lm), counting(usage):
        dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 3")
    assert usage.calls == 1 and usage.errors == 0

    class Broken:
        def complete(self, request):  # noqa: ANN001
            raise RuntimeError("no model here")

    broken = dspy.LM("offline/broken", engine=Broken(), cache=False, num_retries=0)  # built elsewhere: no meter
    with dspy.context(lm=broken), usage.counting(), pytest.raises(LMError, match="no model here"):
        dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 3")
    assert usage.calls == 2 and usage.errors == 1 and METER in broken.callbacks


def test_an_lm_that_calls_another_lm_counts_as_the_calls_it_makes():
    """A router LM over servers (an engine that calls one LM per server) is not one call more than it makes."""
    inner = build_lm("offline")

    class Router:
        def complete(self, request):  # noqa: ANN001
            return inner(dataclasses.replace(request, model=inner.model))

    router = dspy.LM("offline/router", engine=Router(), cache=False, num_retries=0)
    usage = LMUsage()
    with dspy.context(lm=router), usage.counting():
        assert dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 4").answer == "4"
    assert usage.snapshot()["by_model"] == {"offline/stand-in": 1}
    assert (usage.calls, usage.errors, usage.completion_tokens) == (1, 0, 11)
