"""What validation rejects and keeps, the rating mapper on echoed prompts, and fitting passages to a context."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from persona_dspy.signatures.persona import PersonaUpdate

from persona_dspy.agent.answers import map_to_label
from persona_dspy.evaluation.output_counts import counts_line, invalid_warning, strict_failure
from persona_dspy.lm.budget import PromptTooLong, estimate_tokens, fit_lines, fit_passages, overflow_sizes
from persona_dspy.memory.retrieval import render_passages
from persona_dspy.outputs.validation import OutputStats, answer_rejection, finish_reasons, mostly_invalid, rejection

RATINGS = ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("text", [
    "", "   ", "{persona}", "'{new_persona}'", "{'persona': {'persona': '{persona}'}}", '{"persona": "x"}',
    "{history} {persona}", "[[ ## persona ## ]]\n- likes jazz", "1. `history` (str): the user's past items",
    "Your input fields are:\n1. `persona`",
])
def test_placeholders_and_prompt_echoes_are_rejected(text):
    assert rejection(text) is not None


def test_a_copy_of_the_instructions_is_rejected_but_a_persona_is_kept():
    instructions = PersonaUpdate.instructions
    assert rejection(instructions, instructions=instructions) == "a copy of the signature's own instructions"
    assert rejection("- Prefers politics and world news.\n- Rates generously (4-5).", instructions=instructions) is None
    assert rejection("Preferences:\n- Likes {cats} a lot, reads about them daily.") is None  # braces in real text


REVIEW = ("These strings sound bright and stay in tune for weeks. I would buy them again without a doubt. "
          "The packaging was fine and the shipping was quick enough for me.")
HISTORY = [REVIEW, "A solid tuner that clips on the headstock and reads every string quickly, even in a loud room."]


@pytest.mark.parametrize(("text", "why"), [
    ("Fender guitars", "too short"),  # a bare product name saved as a user's summary
    ("[2014-05-09] 120", "bare date or number"),
    ("Fender Mini Tone Master Amp", "bare name"),
    ("I am not sure what you mean.", "refusal"),  # 9 of 30 users were saved with it under 20% garbage replies
    ("I'm sorry, but I cannot determine the user's preferences.", "refusal"),
    ("Could you clarify what you need?", "refusal"),
    (" ".join(["The user loves the sound of these strings."] * 10), "repeated"),  # a review looping 10 times
    ("- Likes bright strings. - Likes bright strings. - Likes bright strings.", "repeated"),
    ("- Rates gear by how it sounds.\n- {history}", "placeholder"),  # {history} inside a longer summary
    ("- Reviews musical gear.\n- The user wrote: these strings sound bright and stay in tune for weeks.", "copied"),
])
def test_summaries_that_state_nothing_about_the_user_are_rejected(text, why):
    reason = rejection(text, copied_from=HISTORY)
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize("text", [
    "- Rates most products 5 stars, rarely below 4.\n- Reviews guitar strings and tuners.",
    "- Labels of their 12 past items: politics 5, sports 4, travel 3.",
    "- Preferred label: 4",
    "- Praises \"bright\" strings",  # a short quote is not a copy
])
def test_statements_about_the_user_are_kept(text):
    assert rejection(text, copied_from=HISTORY) is None


def test_an_answer_from_an_echoed_prompt_is_no_answer():
    echo = "1. `query` (str): What is the score of this review?\n2. `answer` (Literal['1', '2', '3', '4', '5'])"
    assert answer_rejection(echo) is not None and map_to_label(echo, RATINGS) is None
    assert map_to_label("answer: Literal['1', '2']", RATINGS) is None
    assert answer_rejection("{query}") is not None and answer_rejection("{answer}") is not None
    query = "What is the score of the following review on a scale of 1 to 5? review: Works great, lasts for days"
    assert answer_rejection(query, prompt=(query,)) == "an echo of the prompt"
    for fine in ("4", "4 stars", "Politics.", ""):
        assert answer_rejection(fine, prompt=(query,)) is None
    assert map_to_label("4 stars", RATINGS) == "4"  # free text small models write is still mapped


def test_output_stats_count_and_merge():
    a, b = OutputStats(), OutputStats()
    a.add("answer", checked=1, invalid="a template placeholder")
    a.add("answer", checked=1)
    b.add("summary", checked=1, invalid="empty", retry=True, fallback=True)
    total = OutputStats()
    total.merge(a.snapshot())
    total.merge(b.snapshot())
    snap = total.snapshot()
    assert snap["checked"]["answer"] == 2 and snap["invalid"]["answer"] == 1 and snap["invalid"]["summary"] == 1
    assert snap["retries"]["summary"] == 1 and snap["fallbacks"]["summary"] == 1
    assert snap["reasons"] == ["answer: a template placeholder", "summary: empty"]
    assert "2 of 3 checked outputs invalid (answer 1, summary 1)" in counts_line(snap)
    assert mostly_invalid(snap) and "most of the model's outputs were invalid" in invalid_warning(snap)
    assert not mostly_invalid(a.snapshot()) and invalid_warning(a.snapshot()) is None  # half is not most
    assert strict_failure(b.snapshot(), strict=False) is None
    assert strict_failure(b.snapshot(), strict=True).startswith("--strict: most")
    assert strict_failure(a.snapshot(), strict=True) is None


def test_finish_reasons_from_any_response_shape():
    @dataclass
    class Choice:
        finish_reason: str

    @dataclass
    class Response:
        choices: list

    assert finish_reasons(Response([Choice("length")])) == ["length"]
    assert finish_reasons({"choices": [{"finish_reason": "stop"}]}) == ["stop"]
    assert finish_reasons({"finish_reason": "length"}) == ["length"]
    assert finish_reasons(None) == []


@dataclass(frozen=True)
class P:
    text: str
    item_id: str = "x"
    label: str | None = "4"
    date: str | None = None

    def render(self) -> str:
        return f"{self.text} -> {self.label}"


def test_passages_are_dropped_least_relevant_first_then_shortened():
    passages = [P("best " * 300, "a"), P("good " * 50, "b"), P("ok " * 400, "c"), P("worst " * 300, "d")]
    kept, info = fit_passages(passages, render_passages, fixed_text="persona and query", window=1200, reserve=300)
    room = info["passage_tokens_allowed"]
    assert room == 1200 - 300 - estimate_tokens("persona and query") - 400
    assert estimate_tokens(render_passages(kept)) <= room
    assert [p.item_id for p in kept] == ["a", "b", "c", "d"][:len(kept)]  # the best stay, in order
    assert info["passages_shortened"] >= 1 and kept[1].text == passages[1].text  # short ones keep their text
    tight, info = fit_passages(passages, render_passages, fixed_text="x", window=800, reserve=300)
    assert info["passages_dropped"] >= 1 and [p.item_id for p in tight] == ["a", "b", "c", "d"][:len(tight)]
    same, info = fit_passages(passages[1:2], render_passages, fixed_text="x", window=8000, reserve=300)
    assert same == passages[1:2] and info["passages_shortened"] == info["passages_dropped"] == 0


def test_history_drops_its_oldest_lines_and_a_prompt_that_cannot_fit_names_its_sizes():
    lines = [f"[2020-01-0{i}] item {i} " + "word " * 60 for i in range(1, 8)]
    kept, dropped = fit_lines(lines, fixed_text="instructions", window=900, reserve=200)
    assert dropped > 0 and kept == lines[dropped:]  # the newest stay
    with pytest.raises(PromptTooLong, match=r"needs about \d+ tokens plus 512 for the reply, more than the model's "
                                            r"context of 600 tokens"):
        fit_passages([], render_passages, fixed_text="y" * 600, window=600, reserve=512)


def test_overflow_messages_of_llama_cpp_and_vllm():
    llama = RuntimeError('{"error":{"message":"the request exceeds the available context size, try increasing it",'
                         '"type":"exceed_context_size_error","n_prompt_tokens":2864,"n_ctx":2048}}')
    assert "the prompt (2864 tokens) exceeds the server's context of 2048 tokens" in overflow_sizes(llama)
    vllm = RuntimeError("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens")
    assert "(5000 tokens) exceeds the server's context of 4096 tokens" in overflow_sizes(vllm)
    assert overflow_sizes(RuntimeError("connection refused")) is None


def test_a_program_with_a_placeholder_persona_is_never_saved(sample_memory, tmp_path):
    from persona_dspy.signatures.persona import compose_persona

    from persona_dspy.agent.persona_agent import PersonaAgent
    from persona_dspy.programs import save_program

    histories, memory = sample_memory("LaMP_3", 1)
    agent = PersonaAgent("LaMP_3", memory, "rag", user_id=histories[0].user_id,
                         persona=compose_persona("- Rates most products 4 or 5."))
    path = save_program(agent, tmp_path / "user.json")
    saved = path.read_bytes()
    agent.persona = compose_persona("{'persona': {'persona': '{persona}'}}")
    with pytest.raises(ValueError, match="failed validation"):
        save_program(agent, path)
    assert path.read_bytes() == saved and not (tmp_path / "user.json.versions").exists()


def test_gepa_proposals_that_are_placeholders_keep_the_current_instruction(monkeypatch):
    import dspy
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
    from persona_dspy.signatures.persona import compose_persona

    from persona_dspy.persona.guard import GuardedInstructionProposer, PersonaGuard

    current = compose_persona("- Reads mostly about politics.")
    monkeypatch.setattr(InstructionProposer, "__call__",
                        lambda self, c, d, names: {n: "{new_instruction}" for n in names})  # what a weak model writes
    stats = OutputStats()
    with dspy.context(callbacks=[stats]):
        out = GuardedInstructionProposer(PersonaGuard())({"answer": current}, {"answer": []}, ["answer"])
    assert out == {"answer": current}
    assert stats.snapshot()["invalid"]["update"] == stats.snapshot()["checked"]["update"] == 1
