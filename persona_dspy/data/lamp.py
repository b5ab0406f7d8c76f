"""Loaders for LaMP-format data: official LaMP question/output files and OPPU's per-user files.

Everything is turned into ``list[UserHistory]`` (see ``records.py``) so memory, the agent and the
aligner never see a file format. The loaders are strict: a file is validated completely before
anything is returned, and every problem raises :class:`DataError`, whose message names the file,
the record id (when there is one) and the field. A silently skipped item would change a user's
history, and with it every score computed on that user.

Formats
-------
* LaMP (``load_lamp``): questions ``[{"id", "input", "profile": [...]}]`` (optionally with a
  ``"user_id"``, as the shared development sets add) and outputs
  ``{"task": "LaMP_3", "golds": [{"id", "output"}]}``. Official files call both LaMP-2 variants
  ``"LaMP_2"``; the profile fields decide which one it is (``tasks.resolve_lamp2``).
* OPPU (``load_oppu``): ``user_top_100_history.json`` = ``[{"user_id", "profile": [...],
  "query": [{"id", "input"}]}]`` and ``user_top_100_history_label.json`` = the LaMP outputs format.

Users
-----
If questions carry ``"user_id"`` they are grouped by it. Official LaMP question files carry no user
id, so users are formed from identical profiles: questions whose profiles hold the same set of item
ids belong to one user, whose id is ``"profile-"`` + the first 12 hex digits of the sha256 of the
sorted, newline-joined item ids (stable across runs and machines). A file in which only some
questions carry ``"user_id"`` is rejected, since mixing the two rules would split or merge users
arbitrarily.

History and leakage
-------------------
``UserHistory.items`` is the union of the user's profiles, deduplicated by id and sorted by date
(oldest first; ties and undated histories keep first-seen file order); ``position`` is the rank in
that order. Each ``Query`` keeps exactly its own profile in ``profile_ids``: in time-based LaMP data
a later query's profile holds the earlier queries (with their gold labels), so the union must never
be used as a query's memory.

Dates
-----
``date`` is optional on profile items. Accepted: ISO dates and datetimes (``YYYY-MM-DD``,
``YYYY-MM-DDTHH:MM:SS``, with ``Z`` or an offset, which is converted to naive UTC), the non-padded
``YYYY-M-D`` that LaMP's own recency ranker also reads, a bare 4-digit year (int or string; read
as January 1st), and unix timestamps in seconds (int/float >= 1e8, or digit strings of 9+ digits).
Within one user either every item is dated or none is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from persona_dspy.data.records import HistoryItem, Query, UserHistory
from persona_dspy.data.tasks import TASKS, TaskSpec, get_task, normalize_task_name, resolve_lamp2

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

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
_SCORE_RE = re.compile(r"([1-5])(?:\.0+)?")
_LOOSE_DATE_RE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")
_YEAR_RE = re.compile(r"\d{4}")
_TIMESTAMP_RE = re.compile(r"\d{9,}(?:\.\d+)?")


class DataError(ValueError):
    """A data file that cannot be loaded as it is.

    The message always names the file, the record (kind and id) when there is one, and the field,
    so a bad record can be found in a multi-megabyte file without a debugger.
    """

    def __init__(self, path: PathLike, problem: str, *, record: str | None = None, record_id: object = None,
                 field: str | None = None, context: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.record = record
        self.record_id = None if record_id is None else str(record_id)
        self.field = field
        self.context = context
        parts = [self.path]
        if record is not None:
            where = f"{record} {self.record_id!r}" if self.record_id is not None else record
            if context:
                where += f" ({context})"
            parts.append(where)
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: rebuild from them, so the error survives pickling (worker processes).
        return _rebuild_error, (type(self), self.path, self.problem, self.record, self.record_id, self.field,
                                self.context)


def _rebuild_error(cls: type[DataError], path: str, problem: str, record: str | None, record_id: str | None,
                   field: str | None, context: str | None) -> DataError:
    return cls(path, problem, record=record, record_id=record_id, field=field, context=context)


class DatasetNotFoundError(DataError, FileNotFoundError):
    """No shipped sample for a task: a DataError (what callers already catch) and a FileNotFoundError."""


# --------------------------------------------------------------------------------------------- dates


def parse_date(value: Any) -> datetime:
    """Read a profile item's date into a naive UTC datetime; ValueError if it is not a date.

    Timezone-aware values are converted to UTC and made naive so every item of a user compares.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a date: {value!r}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"not a date: {value!r}")
        if isinstance(value, int) and 1000 <= value <= 9999:
            return datetime(value, 1, 1)
        if abs(value) >= 1e8:
            return _from_timestamp(float(value))
        raise ValueError(f"not a date (neither a 4-digit year nor a unix timestamp): {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"not a date: {value!r}")
    text = value.strip()
    if _TIMESTAMP_RE.fullmatch(text):
        return _from_timestamp(float(text))
    if _YEAR_RE.fullmatch(text):
        return datetime(int(text), 1, 1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        loose = _LOOSE_DATE_RE.fullmatch(text)
        if not loose:
            raise ValueError(f"not an ISO date/datetime or unix timestamp: {value!r}") from None
        year, month, day = (int(g) for g in loose.groups())
        parsed = datetime(year, month, day)  # raises ValueError on e.g. month 13
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _from_timestamp(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"unix timestamp out of range: {seconds!r}") from exc


def _cutoff(dates: Iterable[datetime]) -> datetime | None:
    """The day after the newest date (midnight): everything in the profile is strictly before it."""
    newest = max(dates, default=None)
    if newest is None:
        return None
    return datetime.combine(newest.date(), time()) + timedelta(days=1)


# ---------------------------------------------------------------------------------------- raw files


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"  # Python's message may end in "at" already
        raise DataError(path, f"not valid JSON ({exc.msg.removesuffix(' at')} at {where})") from None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _record_id(path: Path, record: Mapping[str, Any], kind: str, index: int, context: str | None = None) -> str:
    """The record's ``id`` as a string (files sometimes use ints)."""
    if "id" not in record:
        raise DataError(path, "missing", record=kind, record_id=f"#{index}", field="id", context=context)
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(path, f"must be a string or an integer, got {_type_name(value)}", record=kind,
                        record_id=f"#{index}", field="id", context=context)
    text = str(value)
    if not text.strip():
        raise DataError(path, "is empty", record=kind, record_id=f"#{index}", field="id", context=context)
    return text


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


# ------------------------------------------------------------------------------------------- values


def _normalize_label(spec: TaskSpec, value: Any) -> str:
    """The label as the task's label list spells it; ValueError when it is not one of them.

    LaMP-3 scores appear as "5", 5 or "5.0" depending on who wrote the file: all become "5".
    """
    labels = spec.labels
    if spec.name == "LaMP_3":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a score 1-5")
        if isinstance(value, int) and 1 <= value <= 5:
            return str(value)
        if isinstance(value, float) and value.is_integer() and 1 <= value <= 5:
            return str(int(value))
        if isinstance(value, str):
            match = _SCORE_RE.fullmatch(value.strip())
            if match:
                return match.group(1)
        raise ValueError(f"{value!r} is not a score 1-5")
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_type_name(value)}")
    if labels is not None and value not in labels:
        raise ValueError(f"{value!r} is not one of the {spec.name} labels: {', '.join(labels)}")
    return value


def _field_text(value: Any) -> str:
    """A profile field as text: strings as they are, numbers via str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"must be text, got {_type_name(value)}")


def _extra_text(value: Any) -> str:
    """Fields the task does not use are kept, as text (JSON for structured values)."""
    try:
        return _field_text(value)
    except ValueError:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)


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
        raise DataError(path, f"must be an object, got {_type_name(raw)}", record="profile item",
                        record_id=f"#{index}", context=context)
    item_id = _record_id(path, raw, "profile item", index, context)

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
                checked[name] = _normalize_label(spec, raw[name])
            else:
                checked[name] = _field_text(raw[name])
        except ValueError as exc:
            raise fail(name, str(exc)) from None
    # The file's field order; fields the task does not use are kept too.
    fields = {name: checked[name] if name in checked else _extra_text(value)
              for name, value in raw.items() if name not in ("id", "date")}
    return _Item(item_id, date, fields)


def _parse_profile(path: Path, spec: TaskSpec, raw: Any, record: str, record_id: str) -> tuple[_Item, ...]:
    """The items of one profile (of a question, or of an OPPU user), validated against the task."""
    context = f"{record} {record_id!r}"
    if not isinstance(raw, list):
        raise DataError(path, f"must be a list of profile items, got {_type_name(raw)}", record=record,
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
            return _normalize_label(spec, value)
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_type_name(value)}")
        return value
    except ValueError as exc:
        raise DataError(path, str(exc), record=record, record_id=question_id, field=field) from None


def _read_golds(path: Path) -> tuple[str | None, dict[str, Any]]:
    """The outputs file's task (None when absent) and its raw outputs by question id."""
    data = _read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(path, f'expected an object {{"task", "golds": [...]}}, got {_type_name(data)}')
    task = None
    if "task" in data:
        raw_task = data["task"]
        if not isinstance(raw_task, str):
            raise DataError(path, f"must be a string, got {_type_name(raw_task)}", field="task")
        try:
            task = _normalize_task(raw_task)
        except ValueError as exc:
            raise DataError(path, str(exc), field="task") from None
    if "golds" not in data:
        raise DataError(path, "missing", field="golds")
    golds = data["golds"]
    if not isinstance(golds, list):
        raise DataError(path, f"must be a list, got {_type_name(golds)}", field="golds")
    outputs: dict[str, Any] = {}
    for index, gold in enumerate(golds):
        if not isinstance(gold, Mapping):
            raise DataError(path, f"must be an object, got {_type_name(gold)}", record="gold", record_id=f"#{index}")
        gold_id = _record_id(path, gold, "gold", index)
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
              _cutoff(i.date for i in q.profile if i.date is not None))
        for q in questions
    ]
    return UserHistory(user_id=user_id, task=spec.name, items=items, queries=queries)


def _question_text(path: Path, record: Mapping[str, Any], kind: str, record_id: str) -> str:
    if "input" not in record:
        raise DataError(path, "missing", record=kind, record_id=record_id, field="input")
    value = record["input"]
    if not isinstance(value, str):
        raise DataError(path, f"must be a string, got {_type_name(value)}", record=kind, record_id=record_id,
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

    raw = _read_json(qpath)
    if not isinstance(raw, list):
        raise DataError(qpath, f'expected a list of questions [{{"id", "input", "profile"}}], got {_type_name(raw)}')
    file_task, outputs = _read_golds(opath) if opath is not None else (None, None)
    combined = _combine_tasks(file_task, arg_task, opath)

    records: list[tuple[Mapping[str, Any], str]] = []
    seen_ids: set[str] = set()
    for index, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise DataError(qpath, f"must be an object, got {_type_name(record)}", record="question",
                            record_id=f"#{index}")
        qid = _record_id(qpath, record, "question", index)
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

    raw = _read_json(hpath)
    if not isinstance(raw, list):
        raise DataError(hpath, f'expected a list of users [{{"user_id", "profile", "query"}}], got {_type_name(raw)}')
    file_task, outputs = _read_golds(lpath) if lpath is not None else (None, None)
    combined = _combine_tasks(file_task, arg_task, lpath)

    users_raw: list[tuple[Mapping[str, Any], str]] = []
    seen_users: set[str] = set()
    for index, record in enumerate(raw):
        if not isinstance(record, Mapping):
            raise DataError(hpath, f"must be an object, got {_type_name(record)}", record="user", record_id=f"#{index}")
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
            raise DataError(hpath, f"must be a list of queries, got {_type_name(record['query'])}", record="user",
                            record_id=user_id, field="query")
        users_raw.append((record, user_id))
    spec = _spec_for(combined, hpath, (r["profile"] for r, _ in users_raw if isinstance(r["profile"], list)))

    entries: list[tuple[Mapping[str, Any], str, str]] = []  # (query record, query id, user id)
    seen_ids: set[str] = set()
    inline: dict[str, Any] = {}
    for record, user_id in users_raw:
        for index, query in enumerate(record["query"]):
            if not isinstance(query, Mapping):
                raise DataError(hpath, f"must be an object, got {_type_name(query)}", record="query",
                                record_id=f"#{index}", context=f"user {user_id!r}")
            qid = _record_id(hpath, query, "query", index, f"user {user_id!r}")
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
                                           "rebuild them with `python persona_dspy/data/samples/make_samples.py`)")
    return folder
