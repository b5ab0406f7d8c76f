"""Loaders for LaMP-format data (official LaMP question/output files, OPPU's per-user files, LaMP-layout folders).

Everything becomes ``list[UserHistory]`` (``records.py``), so memory, the agent and the aligner never see a file
format. The loaders are strict: a file is validated completely before anything is returned, and every problem raises
``DataError`` naming the file, the record id and the field, because a silently skipped item would change a user's
history and every score computed on it. Users are grouped by ``user_id``, or by identical profiles where the files
carry none; each ``Query`` keeps exactly its own profile, since a later query's profile holds earlier gold answers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from persona_dspy.data.lamp_fields import (
    DataError,
    DatasetNotFoundError,
    PathLike,
    extra_text,
    field_text,
    normalize_label,
    parse_date,
    profile_cutoff,
    read_json,
    read_record_id,
    type_name,
)
from persona_dspy.data.records import HistoryItem, Query, UserHistory
from persona_dspy.data.tasks import TASKS, TaskSpec, get_task, normalize_task_name, resolve_lamp2

logger = logging.getLogger(__name__)


# OPPU names its data folders and --task_name after the task, not the LaMP id (OPPU utils.name2taskid).
OPPU_TASK_NAMES: dict[str, str] = {
    "citation": "LaMP_1",
    "movie_tagging": "LaMP_2M",
    "news_categorize": "LaMP_2N",
    "news_headline": "LaMP_4",
    "product_rating": "LaMP_3",
    "scholarly_title": "LaMP_5",
    "tweet_paraphrase": "LaMP_7",
}

_PROFILE_USER_PREFIX = "profile-"


# ------------------------------------------------------------------------------------------- tasks


def _normalize_task(name: str) -> str:
    """A LaMP task key (maybe the ambiguous 'LaMP_2'); OPPU folder names are accepted too."""
    key = OPPU_TASK_NAMES.get(name.strip().lower())
    return key if key else normalize_task_name(name)


def _combine_tasks(file_task: str | None, arg_task: str | None, outputs_path: Path | None) -> str | None:
    """The task named by the outputs file and/or the caller; 'LaMP_2' agrees with either variant."""
    if file_task is None or arg_task is None:
        return file_task or arg_task
    if file_task == arg_task:
        return file_task
    if {file_task, arg_task} in ({"LaMP_2", "LaMP_2N"}, {"LaMP_2", "LaMP_2M"}):
        return arg_task if file_task == "LaMP_2" else file_task
    assert outputs_path is not None
    raise DataError(outputs_path, f"the file says {file_task!r} but task={arg_task!r} was given", field="task")


def _resolve_lamp2(path: Path, profiles: Iterable[Sequence[Any]]) -> str:
    for profile in profiles:
        for item in profile:
            if isinstance(item, Mapping):
                return resolve_lamp2(dict(item))
    raise DataError(path, "task 'LaMP_2' is ambiguous and no profile item tells news from movies; "
                          "pass task='LaMP_2N' or task='LaMP_2M'", field="task")


# ------------------------------------------------------------------------------------ parsed records


@dataclass(frozen=True)
class _Item:
    id: str
    date: datetime | None
    fields: dict[str, str]

    def same_content(self, other: _Item) -> bool:
        return self.date == other.date and self.fields == other.fields


@dataclass(frozen=True)
class _Question:
    id: str
    input: str
    gold: str
    profile: tuple[_Item, ...]
    user_id: str | None


def _parse_item(path: Path, spec: TaskSpec, raw: Any, index: int, context: str) -> _Item:
    if not isinstance(raw, Mapping):
        raise DataError(path, f"must be an object, got {type_name(raw)}", record="profile item",
                        record_id=f"#{index}", context=context)
    item_id = read_record_id(path, raw, "profile item", index, context)

    def fail(field: str, problem: str) -> DataError:
        return DataError(path, problem, record="profile item", record_id=item_id, field=field, context=context)

    date = None
    if "date" in raw and raw["date"] is not None:
        try:
            date = parse_date(raw["date"])
        except ValueError as exc:
            raise fail("date", f"unparsable date: {exc}") from None
    checked: dict[str, str] = {}
    for name in spec.profile_fields:
        if name not in raw:
            raise fail(name, f"missing (a {spec.name} profile item needs {', '.join(spec.profile_fields)})")
        try:
            if name == spec.label_field:
                checked[name] = normalize_label(spec, raw[name])
            else:
                checked[name] = field_text(raw[name])
        except ValueError as exc:
            raise fail(name, str(exc)) from None
    # The file's field order; fields the task does not use are kept too.
    fields = {name: checked[name] if name in checked else extra_text(value)
              for name, value in raw.items() if name not in ("id", "date")}
    return _Item(item_id, date, fields)


def _parse_profile(path: Path, spec: TaskSpec, raw: Any, record: str, record_id: str) -> tuple[_Item, ...]:
    """The items of one profile (of a question, or of an OPPU user), validated against the task."""
    context = f"{record} {record_id!r}"
    if not isinstance(raw, list):
        raise DataError(path, f"must be a list of profile items, got {type_name(raw)}", record=record,
                        record_id=record_id, field="profile")
    seen: dict[str, _Item] = {}
    items: list[_Item] = []
    for index, raw_item in enumerate(raw):
        item = _parse_item(path, spec, raw_item, index, context)
        previous = seen.get(item.id)
        if previous is None:
            seen[item.id] = item
            items.append(item)
        elif not previous.same_content(item):
            raise DataError(path, "duplicate id with different content in the same profile", record="profile item",
                            record_id=item.id, field="id", context=context)
    return tuple(items)


def _parse_gold(path: Path, spec: TaskSpec, value: Any, question_id: str, record: str = "gold",
                field: str = "output") -> str:
    """A gold output, checked against the task's label list (LaMP-3 scores normalised)."""
    try:
        if spec.labels is not None:
            return normalize_label(spec, value)
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type_name(value)}")
        return value
    except ValueError as exc:
        raise DataError(path, str(exc), record=record, record_id=question_id, field=field) from None


def _read_golds(path: Path) -> tuple[str | None, dict[str, Any]]:
    """The outputs file's task (None when absent) and its raw outputs by question id."""
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(path, f'expected an object {{"task", "golds": [...]}}, got {type_name(data)}')
    task = None
    if "task" in data:
        raw_task = data["task"]
        if not isinstance(raw_task, str):
            raise DataError(path, f"must be a string, got {type_name(raw_task)}", field="task")
        try:
            task = _normalize_task(raw_task)
        except ValueError as exc:
            raise DataError(path, str(exc), field="task") from None
    if "golds" not in data:
        raise DataError(path, "missing", field="golds")
    golds = data["golds"]
    if not isinstance(golds, list):
        raise DataError(path, f"must be a list, got {type_name(golds)}", field="golds")
    outputs: dict[str, Any] = {}
    for index, gold in enumerate(golds):
        if not isinstance(gold, Mapping):
            raise DataError(path, f"must be an object, got {type_name(gold)}", record="gold", record_id=f"#{index}")
        gold_id = read_record_id(path, gold, "gold", index)
        if "output" not in gold:
            raise DataError(path, "missing", record="gold", record_id=gold_id, field="output")
        if gold_id in outputs:
            raise DataError(path, "duplicate gold id", record="gold", record_id=gold_id, field="id")
        outputs[gold_id] = gold["output"]
    return task, outputs


def _attach_golds(questions_path: Path, outputs_path: Path | None, spec: TaskSpec, question_ids: Sequence[str],
                  outputs: Mapping[str, Any] | None, inline: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every question's gold: all present when golds are given at all, none unknown."""
    if outputs is None:
        if inline is None:
            return {qid: "" for qid in question_ids}
        golds = {}
        for qid in question_ids:
            if qid not in inline:
                raise DataError(questions_path, "missing (no label file was given, so every query needs its gold)",
                                record="query", record_id=qid, field="gold")
            golds[qid] = _parse_gold(questions_path, spec, inline[qid], qid, "query", "gold")
        return golds
    assert outputs_path is not None
    known = set(question_ids)
    for gold_id in outputs:
        if gold_id not in known:
            raise DataError(outputs_path, f"gold for a question that is not in {questions_path}", record="gold",
                            record_id=gold_id, field="id")
    golds = {}
    for qid in question_ids:
        if qid not in outputs:
            raise DataError(outputs_path, f"no gold for this question of {questions_path}", record="question",
                            record_id=qid, field="output")
        gold = _parse_gold(outputs_path, spec, outputs[qid], qid)
        if inline is not None and qid in inline and _parse_gold(questions_path, spec, inline[qid], qid, "query",
                                                                "gold") != gold:
            raise DataError(questions_path, f"inline gold disagrees with {outputs_path}", record="query",
                            record_id=qid, field="gold")
        golds[qid] = gold
    return golds


# ------------------------------------------------------------------------------------------- users


def profile_user_id(item_ids: Iterable[str]) -> str:
    """The user id given to a profile in files without user ids: a short hash of its sorted item ids."""
    digest = hashlib.sha256("\n".join(sorted(set(item_ids))).encode("utf-8")).hexdigest()
    return _PROFILE_USER_PREFIX + digest[:12]


def _group_by_user(questions: Sequence[_Question]) -> dict[str, list[_Question]]:
    """Questions by user id; without user ids, by the set of profile item ids."""
    groups: dict[str, list[_Question]] = {}
    for question in questions:
        key = question.user_id if question.user_id is not None else profile_user_id(i.id for i in question.profile)
        groups.setdefault(key, []).append(question)
    return groups


def _user_history(path: Path, spec: TaskSpec, user_id: str, profiles: Sequence[tuple[str, Sequence[_Item]]],
                  questions: Sequence[_Question]) -> UserHistory:
    """One user's time-ordered, deduplicated history from the profiles (labelled by where they come from)."""
    seen: dict[str, tuple[_Item, str]] = {}
    order: list[_Item] = []
    for source, profile in profiles:
        for item in profile:
            previous = seen.get(item.id)
            if previous is None:
                seen[item.id] = (item, source)
                order.append(item)
            elif not previous[0].same_content(item):
                differing = sorted(k for k in set(item.fields) | set(previous[0].fields)
                                   if item.fields.get(k) != previous[0].fields.get(k))
                if item.date != previous[0].date:
                    differing.insert(0, "date")
                raise DataError(path, f"duplicate id with different content for user {user_id!r} (differs in "
                                      f"{', '.join(differing)}; first seen in {previous[1]})",
                                record="profile item", record_id=item.id, field="id", context=source)
    dated = [item for item in order if item.date is not None]
    if dated and len(dated) != len(order):
        undated = next(item for item in order if item.date is None)
        raise DataError(path, f"user {user_id!r} has dated and undated items (e.g. {dated[0].id!r} is dated); "
                              "dates must be on all of a user's items or on none",
                        record="profile item", record_id=undated.id, field="date", context=seen[undated.id][1])
    if dated:
        order = sorted(order, key=lambda it: it.date)  # stable: ties keep first-seen order
    items = [HistoryItem.from_fields(spec, it.id, it.date, it.fields, position) for position, it in enumerate(order)]
    queries = [
        Query(q.id, q.input, q.gold, frozenset(i.id for i in q.profile),
              profile_cutoff(i.date for i in q.profile if i.date is not None))
        for q in questions
    ]
    return UserHistory(user_id=user_id, task=spec.name, items=items, queries=queries)


def _question_text(path: Path, record: Mapping[str, Any], kind: str, record_id: str) -> str:
    if "input" not in record:
        raise DataError(path, "missing", record=kind, record_id=record_id, field="input")
    value = record["input"]
    if not isinstance(value, str):
        raise DataError(path, f"must be a string, got {type_name(value)}", record=kind, record_id=record_id,
                        field="input")
    return value


def _user_id(path: Path, record: Mapping[str, Any], kind: str, record_id: str) -> str:
    value = record["user_id"]
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise DataError(path, f"must be a non-empty string or an integer, got {value!r}", record=kind,
                        record_id=record_id, field="user_id")
    return str(value)


def _spec_for(task: str | None, path: Path, profiles: Iterable[Sequence[Any]]) -> TaskSpec:
    if task is None:
        raise DataError(path, "no task: the outputs file names none and task= was not given", field="task")
    if task == "LaMP_2":
        task = _resolve_lamp2(path, profiles)
    return TASKS[task]


def _log_loaded(users: Sequence[UserHistory], path: Path) -> None:
    logger.info("loaded %d users / %d queries / %d history items (%s) from %s", len(users),
                sum(len(u.queries) for u in users), sum(len(u.items) for u in users),
                users[0].task if users else "-", path)


# ------------------------------------------------------------------------------------------ loaders


def load_lamp(questions_path: PathLike, outputs_path: PathLike | None = None, task: str | None = None
              ) -> list[UserHistory]:
    """Load official LaMP questions (and outputs) files, unchanged, into per-user histories.

    ``task`` may be omitted when the outputs file names it; when both are given they must agree
    ("LaMP_2" agrees with LaMP_2N and LaMP_2M, whose variant is then read from the profile fields).
    Without ``outputs_path`` (e.g. official test files) every ``Query.gold`` is ``""``; with it,
    every question needs exactly one gold and golds for unknown questions are an error.
    Users: see the module docstring (``user_id`` if present, else identical profiles).
    """
    qpath = Path(questions_path)
    opath = Path(outputs_path) if outputs_path is not None else None
    arg_task = _normalize_task(task) if task is not None else None

    raw = read_json(qpath)
    if not isinstance(raw, list):
        raise DataError(qpath, f'expected a list of questions [{{"id", "input", "profile"}}], got {type_name(raw)}')
    file_task, outputs = _read_golds(opath) if opath is not None else (None, None)
    combined = _combine_tasks(file_task, arg_task, opath)

    records: list[tuple[Mapping[str, Any], str]] = []
    seen_ids: set[str] = set()
    for index, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise DataError(qpath, f"must be an object, got {type_name(record)}", record="question",
                            record_id=f"#{index}")
        qid = read_record_id(qpath, record, "question", index)
        if qid in seen_ids:
            raise DataError(qpath, "duplicate question id", record="question", record_id=qid, field="id")
        seen_ids.add(qid)
        if "profile" not in record:
            raise DataError(qpath, "missing", record="question", record_id=qid, field="profile")
        records.append((record, qid))
    spec = _spec_for(combined, qpath, (r["profile"] for r, _ in records if isinstance(r["profile"], list)))

    with_user = sum("user_id" in r for r, _ in records)
    if 0 < with_user < len(records):
        missing = next(qid for r, qid in records if "user_id" not in r)
        raise DataError(qpath, "missing here but present on other questions; give it on all questions or on none",
                        record="question", record_id=missing, field="user_id")

    golds = _attach_golds(qpath, opath, spec, [qid for _, qid in records], outputs)
    questions = [
        _Question(
            id=qid,
            input=_question_text(qpath, record, "question", qid),
            gold=golds[qid],
            profile=_parse_profile(qpath, spec, record["profile"], "question", qid),
            user_id=_user_id(qpath, record, "question", qid) if with_user else None,
        )
        for record, qid in records
    ]
    users = [
        _user_history(qpath, spec, user_id, [(f"question {q.id!r}", q.profile) for q in group], group)
        for user_id, group in _group_by_user(questions).items()
    ]
    _log_loaded(users, qpath)
    return users


def load_oppu(history_path: PathLike, label_path: PathLike | None, task: str | None = None) -> list[UserHistory]:
    """Load OPPU's processed per-user files (repo TamSiuhin/OPPU, ``data/<task_name>/``), unchanged.

    ``history_path`` (``user_top_100_history.json``, also ``user_others.json``) is
    ``[{"user_id", "profile": [item, ...], "query": [{"id", "input", ...}]}]``: one profile per user,
    shared by all of the user's queries, which OPPU answers after training on that whole profile.
    So every query's ``profile_ids`` is the full profile. ``label_path``
    (``user_top_100_history_label.json``) is the LaMP outputs format, ``{"task", "golds": [{"id",
    "output"}]}``, read by OPPU's ``eval/evaluation.py``; as in :func:`load_lamp`, every query needs a
    gold there and no gold may name an unknown query. ``user_others.json`` has no label file but inline
    ``query["gold"]`` (what OPPU's ``task_LoRA.py`` trains on): with ``label_path=None`` inline golds
    are used (then every query needs one), and without any, ``Query.gold`` is ``""``. Inline golds
    that disagree with the label file are an error. Users without queries are kept (history only).
    ``task`` accepts LaMP ids and OPPU task names (``movie_tagging`` ...).
    """
    hpath = Path(history_path)
    lpath = Path(label_path) if label_path is not None else None
    arg_task = _normalize_task(task) if task is not None else None

    raw = read_json(hpath)
    if not isinstance(raw, list):
        raise DataError(hpath, f'expected a list of users [{{"user_id", "profile", "query"}}], got {type_name(raw)}')
    file_task, outputs = _read_golds(lpath) if lpath is not None else (None, None)
    combined = _combine_tasks(file_task, arg_task, lpath)

    users_raw: list[tuple[Mapping[str, Any], str]] = []
    seen_users: set[str] = set()
    for index, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise DataError(hpath, f"must be an object, got {type_name(record)}", record="user", record_id=f"#{index}")
        if "user_id" not in record:
            raise DataError(hpath, "missing", record="user", record_id=f"#{index}", field="user_id")
        user_id = _user_id(hpath, record, "user", f"#{index}")
        if user_id in seen_users:
            raise DataError(hpath, "duplicate user id", record="user", record_id=user_id, field="user_id")
        seen_users.add(user_id)
        for name in ("profile", "query"):
            if name not in record:
                raise DataError(hpath, "missing", record="user", record_id=user_id, field=name)
        if not isinstance(record["query"], list):
            raise DataError(hpath, f"must be a list of queries, got {type_name(record['query'])}", record="user",
                            record_id=user_id, field="query")
        users_raw.append((record, user_id))
    spec = _spec_for(combined, hpath, (r["profile"] for r, _ in users_raw if isinstance(r["profile"], list)))

    entries: list[tuple[Mapping[str, Any], str, str]] = []  # (query record, query id, user id)
    seen_ids: set[str] = set()
    inline: dict[str, Any] = {}
    for record, user_id in users_raw:
        for index, query in enumerate(record["query"]):
            if not isinstance(query, Mapping):
                raise DataError(hpath, f"must be an object, got {type_name(query)}", record="query",
                                record_id=f"#{index}", context=f"user {user_id!r}")
            qid = read_record_id(hpath, query, "query", index, f"user {user_id!r}")
            if qid in seen_ids:
                raise DataError(hpath, "duplicate query id", record="query", record_id=qid, field="id")
            seen_ids.add(qid)
            if "gold" in query:
                inline[qid] = query["gold"]
            entries.append((query, qid, user_id))

    golds = _attach_golds(hpath, lpath, spec, [qid for _, qid, _ in entries], outputs, inline or None)
    profiles = {user_id: _parse_profile(hpath, spec, record["profile"], "user", user_id)
                for record, user_id in users_raw}
    by_user: dict[str, list[_Question]] = {user_id: [] for _, user_id in users_raw}
    for query, qid, user_id in entries:
        by_user[user_id].append(
            _Question(qid, _question_text(hpath, query, "query", qid), golds[qid], profiles[user_id], user_id))
    users = [
        _user_history(hpath, spec, user_id, [(f"user {user_id!r}", profiles[user_id])], user_questions)
        for user_id, user_questions in by_user.items()
    ]
    _log_loaded(users, hpath)
    return users


def load_dataset(path: PathLike, split: str = "dev", task: str | None = None) -> list[UserHistory]:
    """Load ``{split}_questions.json`` + ``{split}_outputs.json`` from a folder in the shared layout.

    The outputs file is required here: a folder of a benchmark split without golds is almost always
    a mistake; call :func:`load_lamp` without ``outputs_path`` to load questions alone.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(folder, f"not a directory (expected a folder with {split}_questions.json)")
    return load_lamp(folder / f"{split}_questions.json", folder / f"{split}_outputs.json", task=task)


def data_root() -> Path:
    """The folder of the shipped samples: package data (``persona_dspy/data/samples``), so an installed wheel has it."""
    return Path(__file__).resolve().parent / "samples"


def dataset_dir(task: str) -> Path:
    """The folder of the shipped sample for ``task`` (``persona_dspy/data/samples/<task>``).

    Raises :class:`DatasetNotFoundError` (a DataError and a FileNotFoundError) when it is absent.
    """
    key = get_task(task).name  # refuses the ambiguous 'LaMP_2' with the registry's own message
    folder = data_root() / key
    if not folder.is_dir():
        root = data_root()
        shipped = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DatasetNotFoundError(folder, f"no shipped sample for {key} (shipped: {', '.join(shipped) or 'none'}; "
                                           "rebuild them with `python data/make_samples.py`)")
    return folder
