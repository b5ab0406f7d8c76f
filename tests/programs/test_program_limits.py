"""A hand-edited program file cannot blow up a request: load_program refuses a persona past the aligner's cap."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from persona_dspy.signatures import compose_persona

from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.lm.usage import LMUsage
from persona_dspy.programs import (
    CHARS_PER_WORD,
    DEFAULT_PERSONA_WORDS,
    PERSONA_WORDS_CEILING,
    ProgramFileError,
    load_program,
    program_state,
    save_program,
)
from persona_dspy.testing.offline_lm import offline_lm


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3", 1)


def saved_program(lamp3, tmp_path: Path, mode: str = "rag", metadata: dict | None = None) -> Path:
    histories, memory = lamp3
    agent = PersonaAgent("LaMP_3", memory, mode, user_id=histories[0].user_id)
    agent.persona = compose_persona("- Rates gear by how it sounds.")
    with dspy.context(lm=offline_lm()):
        return save_program(agent, tmp_path / f"{mode}.json", metadata)


def edit_persona(path: Path, persona: str) -> None:
    """Replace the persona consistently in metadata and state, as someone editing the file by hand would."""
    document = json.loads(path.read_text())
    old = document["metadata"]["persona"]
    document["metadata"]["persona"] = persona
    for entry in program_state(document).values():
        instructions = entry["signature"]["instructions"]
        if instructions.startswith(old):  # rag: the persona; react: persona + the tool list
            entry["signature"]["instructions"] = persona + instructions[len(old):]
    path.write_text(json.dumps(document))


def persona_of(words: int, word: str = "loud") -> str:
    return compose_persona("- " + " ".join([word] * words))


@pytest.mark.parametrize("mode", ["rag", "react"])
def test_a_huge_persona_is_refused_and_nothing_is_sent(lamp3, tmp_path, mode):
    path = saved_program(lamp3, tmp_path, mode)
    edit_persona(path, persona_of(100_000))  # the reported file: a request of ~200k tokens
    usage = LMUsage()
    with dspy.context(lm=offline_lm(), callbacks=[usage]), \
            pytest.raises(ProgramFileError, match=rf"over the cap of {DEFAULT_PERSONA_WORDS} words"):
        load_program(path, lamp3[1])
    assert usage.calls == 0


def test_few_but_enormous_words_are_refused_too(lamp3, tmp_path):
    path = saved_program(lamp3, tmp_path)
    edit_persona(path, persona_of(3, "x" * (DEFAULT_PERSONA_WORDS * CHARS_PER_WORD)))
    with pytest.raises(ProgramFileError, match="characters"):
        load_program(path, lamp3[1])


def test_the_cap_the_aligner_recorded_applies_and_a_caller_may_raise_it(lamp3, tmp_path):
    histories, memory = lamp3
    path = saved_program(lamp3, tmp_path, metadata={"alignment": {"max_persona_words": 600}})
    edit_persona(path, persona_of(500))
    assert load_program(path, memory).persona == persona_of(500)  # within the cap its aligner kept to
    edit_persona(path, persona_of(700))
    with pytest.raises(ProgramFileError, match="over the cap of 600 words"):
        load_program(path, memory)
    assert load_program(path, memory, max_persona_words=800).persona == persona_of(700)  # asked for explicitly


def test_a_recorded_cap_cannot_lift_the_ceiling(lamp3, tmp_path):
    path = saved_program(lamp3, tmp_path, metadata={"alignment": {"max_persona_words": 10**9}})
    edit_persona(path, persona_of(PERSONA_WORDS_CEILING + 10))
    with pytest.raises(ProgramFileError, match=f"over the cap of {PERSONA_WORDS_CEILING} words"):
        load_program(path, lamp3[1])


def test_huge_react_step_instructions_are_refused(lamp3, tmp_path):
    """ReAct's step may carry its own instructions (kept as saved): they are bounded like the persona."""
    path = saved_program(lamp3, tmp_path, "react")
    document = json.loads(path.read_text())
    [step] = [name for name in program_state(document) if name.endswith("react")]
    document[step]["signature"]["instructions"] = "Think step by step. " * 50_000
    path.write_text(json.dumps(document))
    with pytest.raises(ProgramFileError, match=f"instructions of predictor {step}"):
        load_program(path, lamp3[1])
