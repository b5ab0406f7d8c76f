"""Program files: JSON round trips per mode, metadata, atomic writes, kept versions and every refusal."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import shutil
from datetime import datetime
from pathlib import Path

import dspy
import pytest
from persona_dspy.signatures import compose_persona

from persona_dspy import programs
from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.data.examples import query_examples
from persona_dspy.programs import (
    FORMAT,
    FORMAT_VERSION,
    ProgramFileError,
    load_program,
    program_versions,
    read_program_metadata,
    save_program,
    versions_dir,
    write_atomically,
)
from persona_dspy.testing.offline_lm import OFFLINE_MODEL, offline_lm

NEUTRAL = compose_persona("- Reads widely; files articles by their main topic.")
RELIGION = compose_persona("- Preferred label: religion\n- marker: zebra-7f3 (a persona no default would contain)")


@pytest.fixture(scope="module")
def lamp2n(sample_memory):
    return sample_memory("LaMP_2N")


@pytest.fixture()
def user(lamp2n) -> str:
    return lamp2n[0][0].user_id


def make_agent(lamp2n, mode: str = "rag", persona: str | None = NEUTRAL, **kwargs) -> PersonaAgent:
    histories, memory = lamp2n
    agent = PersonaAgent("LaMP_2N", memory if mode != "none" else None, mode, user_id=histories[0].user_id, **kwargs)
    if persona is not None:
        agent.persona = persona
    return agent


def predictions(agent: PersonaAgent, histories) -> list[tuple]:
    out = []
    for history in histories:
        for example in query_examples(history):
            p = agent(**example.inputs())
            out.append((p.answer, p.raw_answer, p.reasoning, [x.item_id for x in p.passages]))
    return out


def no_temp_files(*folders: Path) -> bool:
    return not [f for folder in folders if folder.is_dir() for f in folder.iterdir() if f.name.endswith(".tmp")]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", ["rag", "react", "none"])
def test_save_then_load_gives_identical_predictions_and_persona(lamp2n, lm, tmp_path, mode):
    histories, memory = lamp2n
    agent = make_agent(lamp2n, mode)
    path = save_program(agent, tmp_path / "prog.json")
    loaded = load_program(path, memory if mode != "none" else None)
    assert loaded.persona == agent.persona and loaded.mode == mode and loaded.k == agent.k
    assert loaded.user_id == agent.user_id and loaded.task == "LaMP_2N"
    assert loaded.dump_state() == agent.dump_state()
    expected = predictions(agent, histories)
    assert len(expected) == sum(len(h.queries) for h in histories) > 0
    assert predictions(loaded, histories) == expected


@pytest.mark.parametrize("mode", ["rag", "react"])
def test_a_distinctive_persona_survives_and_still_steers(lamp2n, lm, tmp_path, mode):
    histories, memory = lamp2n
    agent = make_agent(lamp2n, mode, persona=RELIGION)
    path = save_program(agent, tmp_path / "prog.json")
    fresh = load_program(path, memory)
    assert fresh.persona == RELIGION and fresh.program_metadata["persona"] == RELIGION
    for predictor in fresh.persona_predictors():
        assert predictor.signature.instructions.startswith(RELIGION)
    if mode == "react":  # the tool list after the persona is the loaded agent's own
        react = fresh.persona_predictors()[0]
        assert react.signature.instructions == agent.persona_predictors()[0].signature.instructions
        assert "search_user_history" in react.signature.instructions
    example = query_examples(histories[1])[0]
    default = PersonaAgent("LaMP_2N", memory, mode)
    assert default(**example.inputs()).answer != "religion"  # so the persona is what makes the difference
    assert fresh(**example.inputs()).answer == "religion"


def test_non_reasoning_and_react_settings_are_restored(lamp2n, lm, tmp_path):
    agent = make_agent(lamp2n, "rag", reasoning=False, k=3, search_mode="sparse")
    loaded = load_program(save_program(agent, tmp_path / "rag.json"), lamp2n[1])
    assert isinstance(loaded.reason.program, dspy.Predict) and not isinstance(loaded.reason.program,
                                                                                dspy.ChainOfThought)
    assert loaded.k == 3 and loaded.retrieve.mode == "sparse"
    react = make_agent(lamp2n, "react", max_iters=2, search_mode="sparse")
    loaded = load_program(save_program(react, tmp_path / "react.json"), lamp2n[1])
    assert loaded.reason.program.max_iters == 2 and loaded.program_metadata["search_mode"] == "sparse"


def test_react_general_tools_must_be_passed_again(lamp2n, lm, tmp_path):
    def word_count(text: str) -> str:
        """Count the words of a text."""
        return str(len(text.split()))

    agent = make_agent(lamp2n, "react", tools=[word_count])
    path = save_program(agent, tmp_path / "prog.json")
    assert read_program_metadata(path)["tools"] == ["word_count"]
    with pytest.raises(ProgramFileError, match=r"saved with tools \['word_count'\]") as info:
        load_program(path, lamp2n[1])
    assert str(path) in str(info.value)
    loaded = load_program(path, lamp2n[1], tools=[word_count])
    assert "word_count" in loaded.reason.program.tools and loaded.persona == agent.persona


def test_react_tool_list_is_rebuilt_even_when_the_step_was_optimized_on_its_own(lamp2n, lm, tmp_path):
    agent = make_agent(lamp2n, "react", persona=RELIGION)
    path = save_program(agent, tmp_path / "prog.json")
    document = json.loads(path.read_text())
    step = document["reason.program.react"]["signature"]
    step["instructions"] = RELIGION + "\nTools: an_old_tool_that_is_gone"
    rewrite(path, document)
    loaded = load_program(path, lamp2n[1])
    assert loaded.persona_predictors()[0].signature.instructions == agent.persona_predictors()[0].signature.instructions
    step["instructions"] = "Think step by step, then call search_user_history."  # e.g. tuned by an optimizer
    rewrite(path, document)  # unguarded text: the agent answers only with the guarded persona and its tool list
    assert (load_program(path, lamp2n[1]).persona_predictors()[0].signature.instructions
            == agent.persona_predictors()[0].signature.instructions)


# ---------------------------------------------------------------- metadata


def test_metadata_is_filled_in_and_caller_keys_are_kept(lamp2n, lm, tmp_path, user):
    agent = make_agent(lamp2n, "rag")
    extra = {"optimizer": "GEPA", "optimizer_settings": {"auto": "light", "seed": 0}, "dev_scores": [0.5, 0.75]}
    path = save_program(agent, tmp_path / "prog.json", extra)
    meta = read_program_metadata(path)
    assert meta["user_id"] == user and meta["task"] == "LaMP_2N" and meta["mode"] == "rag" and meta["k"] == 5
    assert meta["persona"] == NEUTRAL
    assert datetime.fromisoformat(meta["created"]).utcoffset().total_seconds() == 0
    assert meta["persona_dspy_version"] == programs.persona_dspy_version() == "0.1.0"
    assert meta["dspy_version"] == dspy.__version__
    assert meta["lm"]["model"] == OFFLINE_MODEL == "offline/stand-in" and meta["lm"]["offline"] is True
    assert {k: meta[k] for k in extra} == extra
    assert load_program(path, lamp2n[1]).program_metadata == meta
    other = offline_lm(temperature=0.7)
    assert read_program_metadata(save_program(agent, tmp_path / "p2.json", lm=other))["lm"]["temperature"] == 0.7
    with dspy.context(lm=None):
        assert read_program_metadata(save_program(agent, tmp_path / "p3.json"))["lm"] is None


def test_caller_metadata_cannot_overwrite_fixed_keys(lamp2n, lm, tmp_path, user):
    agent = make_agent(lamp2n, "rag")
    for clash in ({"task": "LaMP_3"}, {"user_id": "someone else"}, {"persona": "x"}, {"created": "2000-01-01"}):
        with pytest.raises(ValueError, match="conflicts"):
            save_program(agent, tmp_path / "prog.json", clash)
    save_program(agent, tmp_path / "prog.json", {"task": "LaMP_2N", "user_id": user})  # same values: no conflict
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        save_program(agent, tmp_path / "bad.json", {"dev_score": math.nan})
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        save_program(agent, tmp_path / "bad.json", {"when": datetime.now()})
    assert not (tmp_path / "bad.json").exists()


def test_an_agent_bound_to_no_user_needs_a_user_id_in_metadata(lamp2n, lm, tmp_path):
    agent = PersonaAgent("LaMP_2N", lamp2n[1], "rag", persona=NEUTRAL)
    with pytest.raises(ValueError, match="bound to no user"):
        save_program(agent, tmp_path / "prog.json")
    assert not (tmp_path / "prog.json").exists()
    path = save_program(agent, tmp_path / "prog.json", {"user_id": "alice"})
    assert load_program(path, lamp2n[1], user_id="alice").user_id == "alice"


# ---------------------------------------------------------------- atomic writes and kept versions


def test_a_failed_replace_leaves_the_old_file_intact_and_no_temp_files(lamp2n, lm, tmp_path, monkeypatch):
    path = tmp_path / "prog.json"
    save_program(make_agent(lamp2n, "rag"), path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash during os.replace")

    monkeypatch.setattr(programs.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_program(make_agent(lamp2n, "rag", persona=RELIGION), path)
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path, versions_dir(path))
    assert load_program(path, lamp2n[1]).persona == NEUTRAL


def test_a_crash_at_any_step_leaves_the_old_or_the_new_complete_file(lamp2n, lm, tmp_path, monkeypatch):
    """Each fsync, link and replace in turn fails as a crash would; the file is always one whole program."""
    path = tmp_path / "prog.json"
    save_program(make_agent(lamp2n, "rag"), path)
    old = path.read_bytes()
    real = {name: getattr(os, name) for name in ("fsync", "link", "replace")}
    outcomes, steps = [], []
    for crash_at in range(1, 20):
        calls: list[str] = []

        def step(name, *args, _crash_at=crash_at, _calls=calls):
            _calls.append(name)
            if len(_calls) == _crash_at:
                raise OSError(f"crash at step {_crash_at} ({name})")
            return real[name](*args)

        for name in real:
            monkeypatch.setattr(programs.os, name, lambda *a, _n=name: step(_n, *a))
        try:
            save_program(make_agent(lamp2n, "rag", persona=RELIGION), path)
            outcome = "new"
        except OSError:
            outcome = "old"
        monkeypatch.undo()
        if outcome == "old":
            assert path.read_bytes() == old
        else:
            assert load_program(path, lamp2n[1]).persona == RELIGION
        assert no_temp_files(tmp_path, versions_dir(path))
        assert [load_program(v, lamp2n[1]).persona for v in program_versions(path)] in ([], [NEUTRAL])
        if len(calls) < crash_at:  # nothing left to crash
            steps = calls
            break
        outcomes.append(outcome)
        path.write_bytes(old)
        shutil.rmtree(versions_dir(path), ignore_errors=True)
    # keep a copy (fsync, link, fsync folder), write the new file (fsync), replace, fsync folder; folder fsyncs are
    # best effort, so a failure there does not fail the save
    assert steps == ["fsync", "link", "fsync", "fsync", "replace", "fsync"]
    assert outcomes == ["old", "old", "new", "old", "old", "new"]


def test_write_atomically_replaces_whole_files_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "reports" / "r.json"
    assert write_atomically(path, b"first\n") == path and path.read_bytes() == b"first\n"  # parents created
    write_atomically(str(path), b"second\n")
    assert path.read_bytes() == b"second\n"

    def crash(src, dst):
        raise OSError("simulated crash during os.replace")

    monkeypatch.setattr(programs.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_atomically(path, b"third\n")
    assert path.read_bytes() == b"second\n" and no_temp_files(path.parent)


def test_the_temp_file_is_fsynced_in_the_same_directory(lamp2n, lm, tmp_path, monkeypatch):
    calls: list[tuple[Path, Path]] = []
    real_replace, synced = os.replace, []
    monkeypatch.setattr(programs.os, "replace", lambda s, d: (calls.append((Path(s), Path(d))), real_replace(s, d)))
    real_fsync = os.fsync
    monkeypatch.setattr(programs.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = save_program(make_agent(lamp2n, "rag"), tmp_path / "sub" / "prog.json")
    [(src, dst)] = calls
    assert dst == path and src.parent == path.parent and src.name.endswith(".tmp") and not src.exists()
    assert synced


def test_earlier_versions_are_kept_and_loadable(lamp2n, lm, tmp_path):
    path = tmp_path / "alice.json"
    personas = [compose_persona(f"- Preferred label: {label}") for label in ("religion", "sports", "travel")]
    created = []
    for persona in personas:
        save_program(make_agent(lamp2n, "rag", persona=persona), path)
        created.append(read_program_metadata(path)["created"])
    versions = program_versions(path)
    assert len(versions) == 2 and all(v.parent == tmp_path / "alice.json.versions" for v in versions)
    assert [load_program(v, lamp2n[1]).persona for v in versions] == personas[:2]  # oldest first
    assert [read_program_metadata(v)["created"] for v in versions] == created[:2]
    assert versions[0].name == datetime.fromisoformat(created[0]).strftime("%Y%m%dT%H%M%S.%fZ") + ".json"
    assert load_program(path, lamp2n[1]).persona == personas[2]
    assert program_versions(tmp_path / "never-saved.json") == []


def test_versions_with_the_same_created_time_get_a_counter(lamp2n, lm, tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "_now", lambda: "2025-01-02T03:04:05.000006+00:00")
    path = tmp_path / "bob.json"
    for label in ("religion", "sports", "travel", "crime"):
        save_program(make_agent(lamp2n, "rag", persona=compose_persona(f"- Preferred label: {label}")), path)
    versions = program_versions(path)
    assert [v.name for v in versions] == ["20250102T030405.000006Z.json", "20250102T030405.000006Z-1.json",
                                          "20250102T030405.000006Z-2.json"]
    assert ["religion" in load_program(v, lamp2n[1]).persona for v in versions] == [True, False, False]


def test_a_version_already_kept_is_not_duplicated(lamp2n, lm, tmp_path, monkeypatch):
    """A save that stopped after keeping the old file but before replacing it: the retry keeps no second copy."""
    path = tmp_path / "prog.json"
    save_program(make_agent(lamp2n, "rag"), path)
    monkeypatch.setattr(programs.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        save_program(make_agent(lamp2n, "rag", persona=RELIGION), path)
    monkeypatch.undo()
    save_program(make_agent(lamp2n, "rag", persona=RELIGION), path)
    assert len(program_versions(path)) == 1


# ---------------------------------------------------------------- refusals


@pytest.fixture()
def saved(lamp2n, lm, tmp_path) -> tuple[Path, dict]:
    path = save_program(make_agent(lamp2n, "rag"), tmp_path / "prog.json")
    return path, json.loads(path.read_text())


def rewrite(path: Path, document) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def _drop(document: dict, *keys: str) -> dict:
    target = document
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]
    return document


def _set(document: dict, value, *keys: str) -> dict:
    target = document
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return document


FILE_PROBLEMS = {
    "empty": (lambda text, doc: "", "empty"),
    "truncated": (lambda text, doc: text[: len(text) // 2], "corrupt or truncated"),
    "not json": (lambda text, doc: "format: persona-dspy/program\n", "corrupt or truncated"),
    "a list": (lambda text, doc: "[1, 2]", "not a program file"),
    "wrong format": (lambda text, doc: _set(doc, "dspy/program", "format"), "format is 'dspy/program'"),
    "no format": (lambda text, doc: _drop(doc, "format"), "format is None"),
    "newer version": (lambda text, doc: _set(doc, FORMAT_VERSION + 1, "format_version"),
                      rf"format_version {FORMAT_VERSION + 1} comes from a newer persona-dspy.*supports format_version "
                      rf"{FORMAT_VERSION}"),
    "bad version": (lambda text, doc: _set(doc, "1", "format_version"), "invalid format_version"),
    "no metadata": (lambda text, doc: _drop(doc, "metadata"), "missing key.*metadata"),
    "no state": (lambda text, doc: _set(doc, 1, "format_version"), "missing key.*state"),  # version 1 kept it there
    "no persona": (lambda text, doc: _drop(doc, "metadata", "persona"), "missing metadata key.*persona"),
    "no user": (lambda text, doc: _drop(doc, "metadata", "user_id"), "missing metadata key.*user_id"),
    "bad k": (lambda text, doc: _set(doc, 0, "metadata", "k"), "k must be positive"),
    "bad mode": (lambda text, doc: _set(doc, "telepathy", "metadata", "mode"), "mode 'telepathy'"),
    "bad created": (lambda text, doc: _set(doc, "yesterday", "metadata", "created"), "not an ISO time"),
    "empty state": (lambda text, doc: {k: doc[k] for k in programs.RESERVED_KEYS}, "state must be"),
}


@pytest.mark.parametrize("problem", list(FILE_PROBLEMS))
def test_unusable_files_are_refused_naming_the_path(saved, lamp2n, problem):
    path, document = saved
    change, message = FILE_PROBLEMS[problem]
    rewrite(path, change(path.read_text(), document))
    for attempt in (lambda: load_program(path, lamp2n[1]), lambda: read_program_metadata(path)):
        with pytest.raises(ProgramFileError, match=message) as info:
            attempt()
        assert str(path) in str(info.value) and info.value.path == path
        assert isinstance(info.value, ValueError)


def test_a_missing_file_is_refused(tmp_path, lamp2n):
    path = tmp_path / "nowhere.json"
    with pytest.raises(ProgramFileError, match="no such program file") as info:
        load_program(path, lamp2n[1])
    assert str(path) in str(info.value)
    with pytest.raises(ProgramFileError, match=str(path)):
        read_program_metadata(path)


def test_another_users_or_tasks_program_is_refused(saved, lamp2n, user):
    path, _ = saved
    other = lamp2n[0][1].user_id
    with pytest.raises(ProgramFileError, match=f"belongs to user '{user}', not '{other}'") as info:
        load_program(path, lamp2n[1], user_id=other)
    assert str(path) in str(info.value)
    with pytest.raises(ProgramFileError, match="for task 'LaMP_2N', not 'LaMP_3'") as info:
        load_program(path, lamp2n[1], task="LaMP_3")
    assert str(path) in str(info.value)
    assert load_program(path, lamp2n[1], user_id=user, task="LaMP_2N").user_id == user


STATE_PROBLEMS = {
    "another predictor": (lambda doc: _set(doc, doc.pop("reason.program.predict"), "reason.program.react"),
                          "does not fit a rag agent"),
    "react state in a rag file": (lambda doc: _set(doc, "react", "metadata", "mode"), "does not fit a react agent"),
    "fewer fields": (lambda doc: doc["reason.program.predict"]["signature"]["fields"].pop() and doc,
                     "has 3 signature fields.*has 4"),
    "no signature": (lambda doc: _drop(doc, "reason.program.predict", "signature"), "signature fields"),
    "no lm key": (lambda doc: _drop(doc, "reason.program.predict", "lm"), "does not fit the agent: KeyError"),
    "bad lm": (lambda doc: _set(doc, 5, "reason.program.predict", "lm"), "does not fit the agent"),
    "persona edited": (lambda doc: _set(doc, "You are someone else.", "metadata", "persona"), "persona in metadata"),
    "no memory for rag": (lambda doc: doc, "needs an EpisodicMemory"),
}


@pytest.mark.parametrize("problem", list(STATE_PROBLEMS))
def test_a_state_that_does_not_fit_the_agent_is_refused(saved, lamp2n, problem):
    path, document = saved
    change, message = STATE_PROBLEMS[problem]
    rewrite(path, change(document))
    memory = None if problem == "no memory for rag" else lamp2n[1]
    with pytest.raises(ProgramFileError, match=message) as info:
        load_program(path, memory)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- no pickle


@pytest.mark.parametrize("mode", ["rag", "react", "none"])
def test_the_file_is_plain_json_and_nothing_pickles(lamp2n, lm, tmp_path, mode):
    path = save_program(make_agent(lamp2n, mode), tmp_path / "prog.json")
    raw = path.read_bytes()
    document = json.loads(raw.decode("utf-8"))
    assert document["format"] == FORMAT and document["format_version"] == FORMAT_VERSION
    assert set(document) == {"format", "format_version", "metadata", *programs.program_state(document)}
    assert not raw.startswith(b"\x80") and b"NaN" not in raw
    assert list(tmp_path.iterdir()) == [path]  # no .pkl or side files
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(inspect.getsource(programs)))
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib", "shelve"}
