"""Program files: any DSPy program's optimized state as plain JSON, saved safely and reloaded strictly.

A file holds one program in the layout of dspy's own ``Module.save`` (so dspy's ``program.load(path)`` reads it):
``{"format", "format_version": 2, "metadata": {...}, "<predictor name>": <its dump_state()>, ...}``; version 1 files
(state under ``"state"``) still load. Any ``dspy.Module`` can be saved; a PersonaAgent's metadata adds user, task,
mode, settings, scores and LM. No pickle is written or read. Writes are atomic and keep the previous file under
``<name>.versions/``; loading refuses another user's or task's file, a corrupt or newer one, or a persona over its
cap, and passes every persona through the guard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.saving import get_dependency_versions

from persona_dspy.agent.persona_agent import MODES, PersonaAgent
from persona_dspy.data.tasks import get_task
from persona_dspy.files import (
    home,
    keep_version,
    kept_versions,
    remove_stale_temp_files,
    versions_dir,  # noqa: F401 - this module's API too: a program file's versions folder
    write_atomically,
)
from persona_dspy.lm.redact import redact_lm_state
from persona_dspy.lm.report import describe_lm
from persona_dspy.memory.episodic import EpisodicMemory, task_namespace
from persona_dspy.memory.retrieval import MEMORY_TOOL_NAME
from persona_dspy.outputs.validation import rejection
from persona_dspy.persona.guard import PersonaGuard, PredictorGuards, guard_program, word_count

logger = logging.getLogger(__name__)

FORMAT = "persona-dspy/program"
FORMAT_VERSION = 2
"""The newest file layout this code reads and the one it writes."""
AGENT_PROGRAM = "persona_dspy.PersonaAgent"
"""``metadata.program`` of a PersonaAgent's file (every version 1 file is one)."""
RESERVED_KEYS = ("format", "format_version", "metadata")
"""Top-level keys that are not predictors (a program with a predictor so named cannot be saved)."""

_REACT_BUILTIN_TOOLS = {MEMORY_TOOL_NAME, "finish"}
FIXED_METADATA_KEYS: tuple[str, ...] = (
    "user_id", "task", "mode", "k", "persona", "created", "persona_dspy_version", "dspy_version", "lm",
    "reasoning", "max_iters", "search_mode", "tools", "summary", "max_persona_words", "demo_chars", "evidence_check",
    "program",
    "guards", "dependency_versions",
)
"""Keys ``save_program`` fills in itself; caller metadata may repeat them only with the same value."""

DEFAULT_PERSONA_WORDS = PersonaGuard.max_words
"""The persona cap of a program that records none: the aligner's default ``max_persona_words``."""
PERSONA_WORDS_CEILING = 2000
"""No recorded cap loads a longer persona (about 3k tokens): a hand-edited file could record any cap it likes."""
CHARS_PER_WORD = 12
"""Characters allowed per capped word: 'words' thousands of characters long must not slip under the cap."""



class ProgramFileError(ValueError):
    """A program file that cannot be used as asked; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ---------------------------------------------------------------- what an agent is made of


def persona_dspy_version() -> str:
    from persona_dspy import __version__

    return __version__


def _general_tools(agent: PersonaAgent) -> list[str]:
    """Names of the tools a react agent has besides its memory search (they must be passed again on load)."""
    if agent.mode != "react":
        return []
    return sorted(name for name in agent.reason.program.tools if name not in _REACT_BUILTIN_TOOLS)


def _tool_name(tool: Callable) -> str:
    return str(getattr(tool, "name", None) or getattr(tool, "__name__", None) or type(tool).__name__)


# ---------------------------------------------------------------- saving


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json_value(key: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata[{key!r}] cannot be stored as JSON: {exc}") from exc


def program_class(program: dspy.Module) -> str:
    """The class a program file records: ``AGENT_PROGRAM`` for a PersonaAgent, else ``module.QualifiedName``."""
    if isinstance(program, PersonaAgent):
        return AGENT_PROGRAM
    return f"{type(program).__module__}.{type(program).__qualname__}"


def _common_metadata(program: dspy.Module, lm: Any) -> dict[str, Any]:
    model = lm if lm is not None else dspy.settings.lm
    return {"program": program_class(program), "dependency_versions": get_dependency_versions(), "created": _now(),
            "persona_dspy_version": persona_dspy_version(), "dspy_version": dspy.__version__,
            "lm": describe_lm(model) if model is not None else None}


def _merged(fixed: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings, got {key!r}")
        if key in fixed and value != fixed[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} conflicts with the value save_program records "
                             f"({fixed[key]!r}); put caller information under another key")
        _json_value(key, value)
    return {**extra, **fixed}


def module_metadata(program: dspy.Module, metadata: Mapping[str, Any] | None = None, *,
                    lm: Any = None) -> dict[str, Any]:
    """The metadata of any other program's file: its class, LM, versions and guards, then the caller's keys."""
    extra = dict(metadata or {})
    if "user_id" in extra and (not isinstance(extra["user_id"], str) or not extra["user_id"].strip()):
        raise ValueError(f"metadata user_id must be a non-empty text, got {extra['user_id']!r}")
    guarding = getattr(program, "persona_guarding", None)
    guards = guarding.to_json() if isinstance(guarding, PredictorGuards) else None
    return _merged({**_common_metadata(program, lm), "guards": guards}, extra)


def build_metadata(agent: PersonaAgent, metadata: Mapping[str, Any] | None = None, *, lm: Any = None) -> dict[str, Any]:
    """The metadata a saved agent carries: fixed facts about the agent and LM, then the caller's own keys."""
    extra = dict(metadata or {})
    user_id = agent.user_id if agent.user_id is not None else extra.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("this agent is bound to no user: build it with user_id=... or pass metadata={'user_id': ...}"
                         " (a program file belongs to one user)")
    fixed: dict[str, Any] = {
        **_common_metadata(agent, lm),
        "user_id": user_id,
        "task": agent.task,
        "mode": agent.mode,
        "k": agent.k,
        "persona": agent.persona,
        "reasoning": agent.reasoning,
        "max_iters": agent.max_iters if agent.mode == "react" else None,
        "search_mode": agent.search_mode if agent.mode != "none" else None,
        "tools": _general_tools(agent),
        "summary": agent.persona_summary,
        "max_persona_words": agent.persona_guard.max_words,
        "demo_chars": agent.demo_chars if agent.mode == "demos" else None,
        "evidence_check": agent.evidence_check if agent.mode == "demos" else None,
    }
    return _merged(fixed, extra)


def program_document(program: dspy.Module, metadata: Mapping[str, Any] | None = None, *,
                     lm: Any = None) -> dict[str, Any]:
    """The whole file content as a dict (what ``save_program`` writes): dspy's state layout plus the metadata."""
    state = _safe_state(program.dump_state(json_mode=True))
    clashes = sorted(set(state) & set(RESERVED_KEYS))
    if clashes:
        raise ValueError(f"the program has predictor(s) named {clashes}, which a program file uses for itself")
    built = (build_metadata(program, metadata, lm=lm) if isinstance(program, PersonaAgent)
             else module_metadata(program, metadata, lm=lm))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": built, **state}


def program_state(document: Mapping[str, Any]) -> dict[str, Any]:
    """The predictor states of a program file's content (version 1 kept them under ``"state"``)."""
    if document.get("format_version") == 1:
        return document["state"]
    return {key: value for key, value in document.items() if key not in RESERVED_KEYS}


def _safe_state(state: dict[str, Any]) -> dict[str, Any]:
    """dspy's state with each predictor-level LM's credentials (user:pw@, ?key=, auth headers) taken out."""
    return {name: {**entry, "lm": redact_lm_state(entry["lm"])} if isinstance(entry.get("lm"), dict) else entry
            for name, entry in state.items()}


def _version_stamp(data: bytes, path: Path) -> str:
    """The file's own created time as a file name stamp (its mtime if it has no readable one)."""
    moment: datetime | None = None
    try:
        created = json.loads(data.decode("utf-8"))["metadata"]["created"]
        moment = datetime.fromisoformat(created)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        logger.warning("%s has no readable created time; its kept version is named by its modification time", path)
    if moment is None:
        moment = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def guard_persona(agent: PersonaAgent, where: str) -> bool:
    """Pass ``agent``'s persona through its guard; True when it had to change it.

    A persona that reached the predictors without the agent's setter (an optimizer such as MIPROv2 writes their
    instructions directly, a file's state is loaded as it is) is untrusted text until then.
    """
    if agent.mode == "none":
        return False
    result = agent.persona_guard.check(agent.persona)
    if not result.intervened:
        return False
    logger.warning("%s: the persona needed the guard (%d line(s) that read as rules or instructions dropped%s)",
                   where, len(result.dropped), ", fixed parts restored" if result.restored_fixed_parts else "")
    agent.persona = result.text
    return True


def _summaries(program: dspy.Module) -> list[str]:
    """The user summaries a program carries: a PersonaAgent's, or each guarded predictor's (``PredictorGuards``)."""
    if isinstance(program, PersonaAgent):
        return [program.persona_summary] if program.mode != "none" else []
    guarding = getattr(program, "persona_guarding", None)
    if not isinstance(guarding, PredictorGuards):
        return []
    predictors = dict(program.named_predictors())
    summaries = (guard.summary(predictors[name].signature.instructions) for name, guard in guarding.guards.items())
    return [summary for summary in summaries if summary]


def save_program(program: dspy.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None, *,
                 lm: Any = None) -> Path:
    """Save ``program`` as JSON, atomically, keeping any earlier file under ``<name>.versions/``.

    A PersonaAgent's file belongs to its user; any other ``dspy.Module`` is saved with its class and guards (a
    ``user_id`` in ``metadata`` is optional). ``metadata`` adds the caller's facts (optimizer and settings, dev
    scores, ...) next to the fixed ones; a key that contradicts a fixed one raises ValueError. ``lm`` is the LM that
    produced the program (default: dspy's current). The persona is guarded first (``guard_persona`` on an agent,
    ``guard_program`` on any other program), so no file holds an unguarded persona, and validated
    (``persona_dspy.outputs.validation.rejection``): a summary that is a placeholder or an echo of a prompt raises
    ValueError and nothing is written, so a file already at ``path`` stays as it was.
    """
    path = Path(path)
    if not isinstance(program, dspy.Module):
        raise TypeError(f"save_program saves a dspy.Module, not a {type(program).__name__}")
    if isinstance(program, PersonaAgent):
        guard_persona(program, f"saving {path}")
    elif guard_program(program):
        logger.warning("saving %s: the persona instructions needed the guard", path)
    for summary in _summaries(program):
        reason = rejection(summary)
        if reason is not None:
            raise ValueError(f"not saving {path}: the persona's user summary failed validation ({reason})")
    document = program_document(program, metadata, lm=lm)
    owner = document["metadata"].get("user_id")
    try:
        data = (json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the program{f' for {owner!r}' if owner else ''} cannot be stored as JSON: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_version(path, _version_stamp)
    write_atomically(path, data)
    logger.info("saved the %s program%s to %s", document["metadata"].get("task") or document["metadata"]["program"],
                f" of user {owner!r}" if owner else "", path)
    return path


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files interrupted saves left in a programs folder and its ``*.versions/`` folders."""
    folder = Path(folder)
    removed = remove_stale_temp_files(folder)
    for versions in folder.glob("*.versions"):
        if versions.is_dir():
            removed += remove_stale_temp_files(versions)
    return removed


program_versions = kept_versions
"""``program_versions(path)``: the kept earlier versions of ``path``, oldest first (empty if it was never replaced)."""


# ---------------------------------------------------------------- loading

_REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "created": str, "persona_dspy_version": str, "dspy_version": str, "lm": (dict, type(None)),
}
_AGENT_METADATA: dict[str, type | tuple[type, ...]] = {"user_id": str, "task": str, "mode": str, "k": int,
                                                       "persona": str}


def _check_types(path: Path, metadata: dict[str, Any], required: Mapping[str, type | tuple[type, ...]]) -> None:
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ProgramFileError(path, f"missing metadata key(s) {', '.join(missing)}")
    for key, kind in required.items():
        value = metadata[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProgramFileError(path, f"metadata {key}={value!r} has the wrong type")


def _read_document(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed and validated file's (metadata, predictor states) (never builds a program)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProgramFileError(path, "no such program file") from None
    except UnicodeDecodeError as exc:
        raise ProgramFileError(path, f"not a program file: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise ProgramFileError(path, f"cannot read the program file: {exc}") from exc
    if not text.strip():
        raise ProgramFileError(path, "the program file is empty")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProgramFileError(path, f"corrupt or truncated program file: invalid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ProgramFileError(path, f"not a program file: the JSON is a {type(document).__name__}, not an object")
    if document.get("format") != FORMAT:
        raise ProgramFileError(path, f"not a program file: format is {document.get('format')!r}, expected {FORMAT!r}")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProgramFileError(path, f"invalid format_version {version!r}: expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise ProgramFileError(path, f"format_version {version} comes from a newer persona-dspy; this version "
                                     f"({persona_dspy_version()}) supports format_version {FORMAT_VERSION}: "
                                     "upgrade persona-dspy to load it")
    missing = [key for key in ("metadata", "state") if key not in document and (key == "metadata" or version == 1)]
    if missing:
        raise ProgramFileError(path, f"missing key(s) {', '.join(missing)} in the program file")
    metadata, state = document["metadata"], program_state(document)
    if not isinstance(metadata, dict):
        raise ProgramFileError(path, "metadata must be a JSON object")
    _check_types(path, metadata, _REQUIRED_METADATA)
    if not isinstance(metadata.setdefault("program", AGENT_PROGRAM), str):
        raise ProgramFileError(path, f"metadata program={metadata['program']!r} has the wrong type")
    if metadata["program"] == AGENT_PROGRAM:
        _check_types(path, metadata, _AGENT_METADATA)
        if not metadata["persona"].strip():
            raise ProgramFileError(path, "metadata persona must not be empty")
        if metadata["mode"] not in MODES:
            raise ProgramFileError(path, f"metadata mode {metadata['mode']!r} is not one of {', '.join(MODES)}")
        if metadata["k"] <= 0:
            raise ProgramFileError(path, f"metadata k must be positive, got {metadata['k']}")
    user_id = metadata.get("user_id", "")
    if metadata["program"] == AGENT_PROGRAM or "user_id" in metadata:
        if not isinstance(user_id, str) or not user_id.strip():
            raise ProgramFileError(path, "metadata user_id must be a non-empty text")
    try:
        datetime.fromisoformat(metadata["created"])
    except ValueError as exc:
        raise ProgramFileError(path, f"metadata created {metadata['created']!r} is not an ISO time") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, dict) for v in state.values()):
        raise ProgramFileError(path, "state must be a non-empty object of predictor states")
    return metadata, state


def read_program_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A program file's validated metadata, without building a program (for listings)."""
    return dict(_read_document(Path(path))[0])


def _saved_persona(agent: PersonaAgent, state: dict[str, Any]) -> str | None:
    """The persona as the state holds it: the instructions of the agent's answering predictor."""
    answering = agent.persona_predictors()[-1]
    name = next(name for name, predictor in agent.named_predictors() if predictor is answering)
    try:
        return str(state[name]["signature"]["instructions"])
    except (KeyError, TypeError):
        return None


def _check_state_fits(path: Path, program: dspy.Module, state: dict[str, Any]) -> None:
    """Predictor names and signature field counts must match: dspy ignores extra keys and zips fields loosely."""
    expected = program.dump_state()
    what = (f"a {program.mode} agent for {program.task}" if isinstance(program, PersonaAgent)
            else f"this {type(program).__name__}")
    if set(state) != set(expected):
        raise ProgramFileError(path, f"the state does not fit {what}: it has predictors {sorted(state)}, the program "
                                     f"has {sorted(expected)}")
    for name, predictor_state in state.items():
        fields = (predictor_state.get("signature") or {}).get("fields")
        wanted = len(expected[name]["signature"]["fields"])
        if not isinstance(fields, list) or len(fields) != wanted:
            count = len(fields) if isinstance(fields, list) else fields
            raise ProgramFileError(path, f"the state of predictor {name} has {count} signature fields, the "
                                         f"signature of {what} has {wanted}")


def _load_module(path: Path, metadata: dict[str, Any], state: dict[str, Any], program: dspy.Module | None,
                 user_id: str | None) -> dspy.Module:
    """Load another program's file into ``program`` (a new instance of the class it records) and guard it."""
    if program is None:
        raise ProgramFileError(path, f"this file holds a {metadata['program']} program: pass program=<a new instance "
                                     "of it> to load its state into (load_program(path, program=...))")
    if program_class(program) != metadata["program"]:
        raise ProgramFileError(path, f"this file holds a {metadata['program']} program, not a "
                                     f"{program_class(program)}")
    if user_id is not None and metadata.get("user_id") != user_id:
        raise ProgramFileError(path, f"this program belongs to user {metadata.get('user_id')!r}, not {user_id!r}")
    guarding = None
    if metadata.get("guards") is not None:
        try:
            guarding = PredictorGuards.from_json(metadata["guards"])
        except (ValueError, AttributeError) as exc:
            raise ProgramFileError(path, f"metadata guards: {exc}") from exc
    _check_state_fits(path, program, state)
    try:
        program.load_state(state)
    except Exception as exc:  # dspy raises KeyError/TypeError/AttributeError/... for a state it cannot apply
        raise ProgramFileError(path, f"the state does not fit the program: {type(exc).__name__}: {exc}") from exc
    if guarding is not None:
        program.persona_guarding = guarding
        changed = guard_program(program)
        if changed:
            logger.warning("%s: the instructions of %s needed the guard", path, ", ".join(changed))
            metadata["guarded_on_load"] = changed
    program.program_metadata = metadata
    logger.info("loaded the %s program from %s", metadata["program"], path)
    return program


def persona_cap(metadata: Mapping[str, Any], max_persona_words: int | None = None) -> int:
    """The longest persona (in words) a program may carry: explicit, else recorded by the aligner, else its default."""
    if max_persona_words is not None:
        return max_persona_words
    alignment = metadata.get("alignment")
    recorded = alignment.get("max_persona_words") if isinstance(alignment, dict) else None  # what the aligner kept to
    if recorded is None:
        recorded = metadata.get("max_persona_words")  # else the saved agent's own cap
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return min(recorded, PERSONA_WORDS_CEILING)
    return DEFAULT_PERSONA_WORDS


def _check_sizes(path: Path, agent: PersonaAgent, state: dict[str, Any], metadata: Mapping[str, Any],
                 max_persona_words: int | None) -> None:
    """A persona (or any predictor's instructions) past the cap is refused: it would be sent with every request."""
    cap = persona_cap(metadata, max_persona_words)
    persona = str(metadata["persona"])
    words, chars = word_count(persona), len(persona)
    if words > cap or chars > cap * CHARS_PER_WORD:
        raise ProgramFileError(path, f"the persona has {words} words ({chars} characters), over the cap of {cap} "
                                     f"words ({cap * CHARS_PER_WORD} characters) the aligner keeps to; refusing to "
                                     "load it (a hand-edited file?). To accept a longer persona on purpose, pass "
                                     "load_program(..., max_persona_words=N)")
    expected = agent.dump_state()
    for name, predictor_state in state.items():
        instructions = (predictor_state.get("signature") or {}).get("instructions")
        # ReAct's step instructions are the persona plus the tool list this agent builds itself.
        limit = cap * CHARS_PER_WORD + len(str(expected[name]["signature"]["instructions"]))
        if isinstance(instructions, str) and len(instructions) > limit:
            raise ProgramFileError(path, f"the instructions of predictor {name} have {len(instructions)} characters, "
                                         f"over the {limit} a persona capped at {cap} words allows; refusing to "
                                         "load them (a hand-edited file?)")


def load_program(path: str | os.PathLike[str], memory: EpisodicMemory | None = None, *,
                 program: dspy.Module | None = None, user_id: str | None = None, task: str | None = None,
                 tools: Sequence[Callable] = (), max_persona_words: int | None = None) -> dspy.Module:
    """The program a file holds, ready, with ``program_metadata`` set.

    A PersonaAgent's file gives a new agent for the file's user, attached to ``memory``: ``user_id``/``task`` guard
    against loading another user's or task's program; ``tools`` are the general tools a react program was saved
    with (their names are checked; the memory-search tool is always built from ``memory``); ``max_persona_words``
    is the longest persona accepted (default: the cap the aligner recorded in the file, else its default, never
    above ``PERSONA_WORDS_CEILING``); a longer one is refused before any request is built. Any other program's file
    is loaded into ``program``, a new instance of the class it records (as dspy's ``Module.load`` does), and its
    persona predictors are guarded (``guard_program``).
    """
    path = Path(path).expanduser()
    metadata, state = _read_document(path)
    if metadata["program"] != AGENT_PROGRAM:
        return _load_module(path, metadata, state, program, user_id)
    if program is not None:
        raise ProgramFileError(path, "this file holds a PersonaAgent: it is rebuilt from the file and its memory; "
                                     "pass memory, not program=")
    if memory is not None and memory.prefix != task_namespace(metadata["task"]):
        logger.warning("%s: memory namespace %r is not the task's %r (EpisodicMemory.for_task): its searches may "
                       "find nothing for this user", path, memory.prefix, task_namespace(metadata["task"]))
    if user_id is not None and metadata["user_id"] != user_id:
        raise ProgramFileError(path, f"this program belongs to user {metadata['user_id']!r}, not {user_id!r}")
    if task is not None:
        try:
            wanted_task = get_task(task).name
        except (KeyError, ValueError):
            wanted_task = task
        if metadata["task"] != wanted_task:
            raise ProgramFileError(path, f"this program is for task {metadata['task']!r}, not {wanted_task!r}")
    saved_tools = sorted(metadata.get("tools") or [])
    given_tools = sorted(_tool_name(t) for t in tools)
    if saved_tools != given_tools:
        raise ProgramFileError(path, f"this program was saved with tools {saved_tools}, but tools {given_tools} were "
                                     "given: pass the same tools")
    options: dict[str, Any] = {"user_id": metadata["user_id"], "k": metadata["k"], "tools": list(tools)}
    for key in ("reasoning", "max_iters", "search_mode", "demo_chars", "evidence_check"):
        if metadata.get(key) is not None:
            options[key] = metadata[key]
    options["max_persona_words"] = persona_cap(metadata, max_persona_words)  # the agent's guard keeps to it too
    try:
        agent = PersonaAgent(metadata["task"], memory, metadata["mode"], **options)
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"cannot build the {metadata['mode']} agent this program describes: {exc}"
        raise ProgramFileError(path, problem) from exc
    _check_state_fits(path, agent, state)
    persona = _saved_persona(agent, state)
    if persona != metadata["persona"]:
        raise ProgramFileError(path, "the persona in metadata differs from the one in the state (edited by hand?)")
    _check_sizes(path, agent, state, metadata, max_persona_words)
    try:
        agent.load_state(state)
    except Exception as exc:  # dspy raises KeyError/TypeError/AttributeError/... for a state it cannot apply
        raise ProgramFileError(path, f"the state does not fit the agent: {type(exc).__name__}: {exc}") from exc
    if agent.mode == "react":
        _refresh_tool_list(path, agent, persona)
    if agent.mode != "none":
        _guard_loaded_persona(path, agent, metadata)
        agent.guard_persona()  # the agent's own record of what is in force (forward would do it before answering)
    if metadata["dspy_version"] != dspy.__version__:
        logger.info("%s was saved with dspy %s; running dspy %s", path, metadata["dspy_version"], dspy.__version__)
    agent.program_metadata = metadata
    logger.info("loaded the %s program of user %r from %s", agent.task, agent.user_id, path)
    return agent


def _guard_loaded_persona(path: Path, agent: PersonaAgent, metadata: dict[str, Any]) -> None:
    """A file's persona is untrusted text like any other: rebuild it through the agent's guard (the file is kept)."""
    if guard_persona(agent, str(path)):
        metadata["persona"], metadata["summary"], metadata["guarded_on_load"] = (agent.persona, agent.persona_summary,
                                                                                 True)


def _refresh_tool_list(path: Path, agent: PersonaAgent, persona: str) -> None:
    """ReAct's step instructions are persona + tool list; the list must describe the tools this agent really has."""
    react = agent.reason.program.react
    current = react.signature.instructions
    if current == persona + agent.reason._tool_suffix:
        return
    if current.startswith(persona):
        logger.warning("%s describes its tools differently from this agent; the persona is kept and the tool list "
                       "is rebuilt", path)
    else:  # the agent answers only with guarded instructions (PersonaAgent.guard_persona)
        logger.warning("%s: the ReAct step has instructions of its own; rebuilt as the persona and tool list", path)
    agent.persona = persona


# ---------------------------------------------------------------- finding a user's program


def program_path(out_dir: str | os.PathLike[str], user_id: str) -> Path:
    """Where ``compile`` saves ``user_id``'s program in ``out_dir``: a name safe on any file system, never colliding.

    ``<readable id>-<10 hex of the id's SHA-256>.json``: user ids may hold any character, so the file name cannot
    be the id itself; apps find a user's file with this function (or ``find_program``), never by listing.
    """
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", user_id).strip("._")[:60] or "user"
    digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:10]
    return Path(out_dir).expanduser() / f"{readable}-{digest}.json"


def default_programs_dir(task: str) -> Path:
    """The folder ``persona-dspy compile --task T`` saves to by default: ``$PERSONA_DSPY_HOME/programs/<task>``."""
    return home() / "programs" / get_task(task).name


def find_program(task: str, user_id: str, programs_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The compiled program file of ``user_id`` for ``task`` (default folder: ``default_programs_dir``), or None."""
    path = program_path(programs_dir if programs_dir is not None else default_programs_dir(task), user_id)
    return path if path.is_file() else None
