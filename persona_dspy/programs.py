"""Per-user program files: a PersonaAgent's optimized state as plain JSON, saved safely and reloaded strictly.

One file holds one user's program::

    {"format": "persona-dspy/program", "format_version": 1,
     "metadata": {"user_id": ..., "task": ..., "mode": ..., "k": ..., "persona": ..., "created": ..., ...},
     "state": agent.dump_state()}

``state`` is dspy's own ``Module.dump_state()``: one entry per predictor (``reason.program.predict`` in rag and
none modes; ``reason.program.react`` and ``reason.program.extract.predict`` in react mode), each with its demos,
traces, train, signature (instructions and field prefixes/descriptions) and LM. The persona is the signature
instructions of the answering predictor, so the state already carries it; ``metadata.persona`` is a copy for
listings, checked against the state on load; ``metadata.summary`` is the persona's only free part (its role and
rules come from the agent's PersonaTemplate), and on load the persona passes the agent's guard like every persona
does, so a file whose summary carries injected rules or instructions loads without them (files written before
``summary`` existed load the same way). No pickle is ever written or read: the file is JSON only, and a
predictor's saved LM is loaded with dspy's safe defaults (no api_base, no custom classes).

Writes are atomic (``write_atomically``, which the report writers use too): the new text goes to a temporary file
in the same directory, is flushed and fsynced, and replaces the old file with ``os.replace``; a crash at any moment
leaves either the old complete file or the new one. Nothing is lost either: before a file is replaced, a copy of it
is kept in the sibling folder ``<name>.versions/`` (e.g. ``alice.json.versions/``), named by its own ``created``
time (``20250101T120000.000000Z.json``, with ``-1``, ``-2`` ... if that name is taken by a different file).
``program_versions(path)`` lists them oldest first; each is a complete program file that ``load_program`` reads.
"""

from __future__ import annotations

import errno
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

from persona_dspy.agent.persona_agent import MODES, PersonaAgent
from persona_dspy.data.tasks import get_task
from persona_dspy.files import fsync_dir, home, remove_stale_temp_files, write_atomically, write_temp
from persona_dspy.lm.redact import redact_lm_state
from persona_dspy.lm.report import describe_lm
from persona_dspy.memory.episodic import EpisodicMemory, task_namespace
from persona_dspy.memory.retrieval import MEMORY_TOOL_NAME
from persona_dspy.outputs.validation import rejection
from persona_dspy.persona.guard import PersonaGuard, word_count

logger = logging.getLogger(__name__)

FORMAT = "persona-dspy/program"
FORMAT_VERSION = 1
"""The newest file layout this code reads and the one it writes."""

_REACT_BUILTIN_TOOLS = {MEMORY_TOOL_NAME, "finish"}
FIXED_METADATA_KEYS: tuple[str, ...] = (
    "user_id", "task", "mode", "k", "persona", "created", "persona_dspy_version", "dspy_version", "lm",
    "reasoning", "max_iters", "search_mode", "tools", "summary", "max_persona_words",
)
"""Keys ``save_program`` fills in itself; caller metadata may repeat them only with the same value."""

DEFAULT_PERSONA_WORDS = PersonaGuard.max_words
"""The persona cap of a program that records none: the aligner's default ``max_persona_words``."""
PERSONA_WORDS_CEILING = 2000
"""No recorded cap loads a longer persona (about 3k tokens): a hand-edited file could record any cap it likes."""
CHARS_PER_WORD = 12
"""Characters allowed per capped word: 'words' thousands of characters long must not slip under the cap."""

_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}
_VERSION_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{6}\.\d{6}Z)(?:-(?P<counter>\d+))?\.json$")


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


def build_metadata(agent: PersonaAgent, metadata: Mapping[str, Any] | None = None, *, lm: Any = None) -> dict[str, Any]:
    """The metadata a saved program carries: fixed facts about the agent and LM, then the caller's own keys."""
    extra = dict(metadata or {})
    user_id = agent.user_id if agent.user_id is not None else extra.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("this agent is bound to no user: build it with user_id=... or pass metadata={'user_id': ...}"
                         " (a program file belongs to one user)")
    model = lm if lm is not None else dspy.settings.lm
    fixed: dict[str, Any] = {
        "user_id": user_id,
        "task": agent.task,
        "mode": agent.mode,
        "k": agent.k,
        "persona": agent.persona,
        "created": _now(),
        "persona_dspy_version": persona_dspy_version(),
        "dspy_version": dspy.__version__,
        "lm": describe_lm(model) if model is not None else None,
        "reasoning": agent.reasoning,
        "max_iters": agent.max_iters if agent.mode == "react" else None,
        "search_mode": agent.search_mode if agent.mode != "none" else None,
        "tools": _general_tools(agent),
        "summary": agent.persona_summary,
        "max_persona_words": agent.persona_guard.max_words,
    }
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings, got {key!r}")
        if key in fixed and value != fixed[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} conflicts with the value save_program records "
                             f"({fixed[key]!r}); put caller information under another key")
        _json_value(key, value)
    return {**extra, **fixed}


def program_document(agent: PersonaAgent, metadata: Mapping[str, Any] | None = None, *,
                     lm: Any = None) -> dict[str, Any]:
    """The whole file content as a dict (what ``save_program`` writes)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": build_metadata(agent, metadata, lm=lm),
            "state": _safe_state(agent.dump_state(json_mode=True))}


def _safe_state(state: dict[str, Any]) -> dict[str, Any]:
    """dspy's state with each predictor-level LM's credentials (user:pw@, ?key=, auth headers) taken out."""
    return {name: {**entry, "lm": redact_lm_state(entry["lm"])} if isinstance(entry.get("lm"), dict) else entry
            for name, entry in state.items()}


def versions_dir(path: str | os.PathLike[str]) -> Path:
    """The sibling folder that keeps earlier versions of ``path``: ``<name>.versions/``."""
    path = Path(path)
    return path.with_name(path.name + ".versions")


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


def _keep_version(path: Path) -> Path | None:
    """Copy the current file into its versions folder (atomically, never over another version) before replacing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    folder = versions_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _version_stamp(data, path)
    tmp = write_temp(folder, f".{stamp}.", data)
    try:
        counter = 0
        while True:
            target = folder / (f"{stamp}.json" if counter == 0 else f"{stamp}-{counter}.json")
            if target.exists():
                if target.read_bytes() == data:  # kept already (an earlier save stopped before its replace)
                    return target
                counter += 1
                continue
            try:
                os.link(tmp, target)  # atomic and never overwrites: a name taken meanwhile raises
            except FileExistsError:
                counter += 1
                continue
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                os.replace(tmp, target)  # no hard links on this filesystem: the exists() check above has to do
            fsync_dir(folder)
            logger.info("kept the previous version of %s as %s", path, target)
            return target
    finally:
        tmp.unlink(missing_ok=True)


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


def save_program(agent: PersonaAgent, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None, *,
                 lm: Any = None) -> Path:
    """Save ``agent``'s program for its user as JSON, atomically, keeping any earlier file under ``<name>.versions/``.

    ``metadata`` adds the caller's facts (optimizer and settings, dev scores, ...) next to the fixed ones; a key that
    contradicts a fixed one raises ValueError. ``lm`` is the LM that produced the program (default: dspy's current).
    The persona is guarded first (``guard_persona``: on ``agent`` itself), so no file holds an unguarded persona,
    and validated (``persona_dspy.outputs.validation.rejection``): a summary that is a placeholder or an echo of a
    prompt raises ValueError and nothing is written, so a file already at ``path`` stays as it was.
    """
    path = Path(path)
    guard_persona(agent, f"saving {path}")
    if agent.mode != "none":
        reason = rejection(agent.persona_summary)
        if reason is not None:
            raise ValueError(f"not saving {path}: the persona's user summary failed validation ({reason})")
    document = program_document(agent, metadata, lm=lm)
    try:
        data = (json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        owner = document["metadata"]["user_id"]
        raise ValueError(f"the program for {owner!r} cannot be stored as JSON: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    _keep_version(path)
    write_atomically(path, data)
    logger.info("saved the %s program of user %r to %s", agent.task, document["metadata"]["user_id"], path)
    return path


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files interrupted saves left in a programs folder and its ``*.versions/`` folders."""
    folder = Path(folder)
    removed = remove_stale_temp_files(folder)
    for versions in folder.glob("*.versions"):
        if versions.is_dir():
            removed += remove_stale_temp_files(versions)
    return removed


def program_versions(path: str | os.PathLike[str]) -> list[Path]:
    """The kept earlier versions of ``path``, oldest first (empty if it was never replaced)."""
    folder = versions_dir(path)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _VERSION_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((match["stamp"], int(match["counter"] or 0), entry))
    return [entry for _, _, entry in sorted(found)]


# ---------------------------------------------------------------- loading

_REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "user_id": str, "task": str, "mode": str, "k": int, "persona": str, "created": str,
    "persona_dspy_version": str, "dspy_version": str, "lm": (dict, type(None)),
}


def _read_document(path: Path) -> dict[str, Any]:
    """The parsed and validated file: format, version, metadata and state (never builds an agent)."""
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
    missing = [key for key in ("metadata", "state") if key not in document]
    if missing:
        raise ProgramFileError(path, f"missing key(s) {', '.join(missing)} in the program file")
    metadata, state = document["metadata"], document["state"]
    if not isinstance(metadata, dict):
        raise ProgramFileError(path, "metadata must be a JSON object")
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ProgramFileError(path, f"missing metadata key(s) {', '.join(missing)}")
    for key, kind in _REQUIRED_METADATA.items():
        value = metadata[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProgramFileError(path, f"metadata {key}={value!r} has the wrong type")
    if not metadata["user_id"].strip() or not metadata["persona"].strip():
        raise ProgramFileError(path, "metadata user_id and persona must not be empty")
    if metadata["mode"] not in MODES:
        raise ProgramFileError(path, f"metadata mode {metadata['mode']!r} is not one of {', '.join(MODES)}")
    if metadata["k"] <= 0:
        raise ProgramFileError(path, f"metadata k must be positive, got {metadata['k']}")
    try:
        datetime.fromisoformat(metadata["created"])
    except ValueError as exc:
        raise ProgramFileError(path, f"metadata created {metadata['created']!r} is not an ISO time") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, dict) for v in state.values()):
        raise ProgramFileError(path, "state must be a non-empty object of predictor states")
    return document


def read_program_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A program file's validated metadata, without building an agent (for listings)."""
    return dict(_read_document(Path(path))["metadata"])


def _saved_persona(agent: PersonaAgent, state: dict[str, Any]) -> str | None:
    """The persona as the state holds it: the instructions of the agent's answering predictor."""
    answering = agent.persona_predictors()[-1]
    name = next(name for name, predictor in agent.named_predictors() if predictor is answering)
    try:
        return str(state[name]["signature"]["instructions"])
    except (KeyError, TypeError):
        return None


def _check_state_fits(path: Path, agent: PersonaAgent, state: dict[str, Any]) -> None:
    """Predictor names and signature field counts must match: dspy ignores extra keys and zips fields loosely."""
    expected = agent.dump_state()
    if set(state) != set(expected):
        raise ProgramFileError(path, f"the state does not fit a {agent.mode} agent for {agent.task}: it has "
                                     f"predictors {sorted(state)}, the agent has {sorted(expected)}")
    for name, predictor_state in state.items():
        fields = (predictor_state.get("signature") or {}).get("fields")
        wanted = len(expected[name]["signature"]["fields"])
        if not isinstance(fields, list) or len(fields) != wanted:
            count = len(fields) if isinstance(fields, list) else fields
            raise ProgramFileError(path, f"the state of predictor {name} has {count} signature fields, the agent's "
                                         f"{agent.task} signature has {wanted}")


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


def load_program(path: str | os.PathLike[str], memory: EpisodicMemory | None, *, user_id: str | None = None,
                 task: str | None = None, tools: Sequence[Callable] = (),
                 max_persona_words: int | None = None) -> PersonaAgent:
    """A ready PersonaAgent for the file's user, attached to ``memory``, with ``program_metadata`` set.

    ``user_id``/``task`` guard against loading another user's or task's program. ``tools`` are the general tools a
    react program was saved with (their names are checked; the memory-search tool is always built from ``memory``).
    ``max_persona_words``: the longest persona accepted (default: the cap the aligner recorded in the file, else
    its default, never above ``PERSONA_WORDS_CEILING``); a longer one is refused before any request is built.
    """
    path = Path(path).expanduser()
    document = _read_document(path)
    metadata, state = dict(document["metadata"]), document["state"]
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
    for key in ("reasoning", "max_iters", "search_mode"):
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
        agent.persona = persona
    else:
        logger.info("%s: the ReAct step has its own optimized instructions; kept as saved", path)


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
