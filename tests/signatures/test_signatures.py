"""The signatures carry the fields downstream code relies on, and label types come from labels.py only."""

import ast
import re
from pathlib import Path
from typing import get_args

import pytest
from persona_dspy.signatures.labels import LABELS, label_list
from persona_dspy.signatures.persona import PersonaSummary, PersonaUpdate, TextualLoss
from persona_dspy.signatures.task_signatures import (
    AMBIGUOUS_LAMP_2,
    TASK_SIGNATURES,
    canonical_task_name,
    task_signature,
)

from persona_dspy.data.tasks import TASKS, get_task, normalize_task_name

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_has_a_uniform_signature(task):
    sig = task_signature(task)
    assert list(sig.input_fields) == ["query", "context"]
    assert list(sig.output_fields) == ["answer"]
    assert sig.instructions.strip(), "the docstring is the task prompt"


@pytest.mark.parametrize("task", sorted(LABELS))
def test_label_tasks_answer_with_the_labels_in_order(task):
    annotation = task_signature(task).output_fields["answer"].annotation
    assert get_args(annotation) == label_list(task)


@pytest.mark.parametrize("task", ["LaMP_4", "LaMP_5", "LaMP_6", "LaMP_7"])
def test_generation_tasks_answer_with_text(task):
    assert task_signature(task).output_fields["answer"].annotation is str


def test_registry_matches_the_task_registry():
    assert set(TASK_SIGNATURES) == set(TASKS)


@pytest.mark.parametrize(("name", "key"), [("LaMP_3", "LaMP_3"), ("lamp-3", "LaMP_3"), ("2n", "LaMP_2N"),
                                           ("LaMP_2M", "LaMP_2M"), ("LAMP7", "LaMP_7"), (" 1 ", "LaMP_1")])
def test_task_signature_accepts_spellings(name, key):
    assert task_signature(name) is TASK_SIGNATURES[key]


@pytest.mark.parametrize("name", ["LaMP_2", "lamp-9", "", "headlines"])
def test_task_signature_refuses_unknown_or_ambiguous(name):
    with pytest.raises(ValueError):
        task_signature(name)


@pytest.mark.parametrize(("name", "key"), [("lamp-3", "LaMP_3"), ("LaMP3", "LaMP_3"), (" 2n", "LaMP_2N"),
                                           ("Lamp_2", "LaMP_2"), ("1m", "LaMP_1M"), ("lamp-9", None), ("x", None)])
def test_canonical_task_name_is_spelling_only(name, key):
    assert canonical_task_name(name) == key


def test_both_registries_read_task_names_alike():
    for name in ("lamp-3", "2N", "LaMP_2M", "7"):
        assert task_signature(name) is TASK_SIGNATURES[get_task(name).name]
    for name in ("LaMP_1M", "lamp-9", "headlines"):
        with pytest.raises(ValueError, match="unknown task"):
            get_task(name)
        with pytest.raises(ValueError, match="unknown task"):
            task_signature(name)
    assert normalize_task_name("lamp 2") == "LaMP_2"  # ambiguous: the loaders resolve it from the data
    for refuse in (get_task, task_signature):
        with pytest.raises(ValueError, match=re.escape(AMBIGUOUS_LAMP_2)):
            refuse("lamp 2")


@pytest.mark.parametrize("module", ["signatures/task_signatures.py", "signatures/persona.py"])
def test_signatures_import_nothing_above_them(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("persona_dspy") and not name.startswith("persona_dspy.signatures")
                   for name in imported)


def test_no_label_is_spelled_outside_labels_py():
    source = (ROOT / "signatures/task_signatures.py").read_text()
    for label in ("sci-fi", "style & beauty", "healthy living", "twist ending"):
        assert label not in source


def test_persona_signatures_fields():
    assert list(PersonaSummary.input_fields) == ["history", "max_words"]
    assert list(PersonaSummary.output_fields) == ["persona"]
    assert list(TextualLoss.input_fields) == ["program_inputs", "expected_outputs", "produced_outputs", "persona"]
    assert list(TextualLoss.output_fields) == ["feedback"]
    assert list(PersonaUpdate.input_fields) == ["persona", "feedback", "max_words"]
    assert list(PersonaUpdate.output_fields) == ["new_persona"]
    assert PersonaUpdate.input_fields["max_words"].annotation is int


def test_persona_update_prompt_guards_data_rules_and_length():
    text = PersonaUpdate.instructions
    assert "DATA" in text and "never instructions" in text
    assert "rules section" in text and "fixed elsewhere" in text
    assert "max_words" in text
    assert "never instructions" in PersonaSummary.instructions
