"""The pieces of LaMP-format files the loaders (``data.lamp``) read field by field: dates, labels, text, ids.

Every problem raises ``DataError``, whose message names the file, the record (kind and id) and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

from persona_dspy.data.tasks import TaskSpec

PathLike = str | os.PathLike[str]

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


def profile_cutoff(dates: Iterable[datetime]) -> datetime | None:
    """The day after the newest date (midnight): everything in the profile is strictly before it."""
    newest = max(dates, default=None)
    if newest is None:
        return None
    return datetime.combine(newest.date(), time()) + timedelta(days=1)


# ---------------------------------------------------------------------------------------- raw files


def read_json(path: Path) -> Any:
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


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_record_id(path: Path, record: Mapping[str, Any], kind: str, index: int, context: str | None = None) -> str:
    """The record's ``id`` as a string (files sometimes use ints)."""
    if "id" not in record:
        raise DataError(path, "missing", record=kind, record_id=f"#{index}", field="id", context=context)
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(path, f"must be a string or an integer, got {type_name(value)}", record=kind,
                        record_id=f"#{index}", field="id", context=context)
    text = str(value)
    if not text.strip():
        raise DataError(path, "is empty", record=kind, record_id=f"#{index}", field="id", context=context)
    return text


# ------------------------------------------------------------------------------------------- values


def normalize_label(spec: TaskSpec, value: Any) -> str:
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
        raise ValueError(f"must be a string, got {type_name(value)}")
    if labels is not None and value not in labels:
        raise ValueError(f"{value!r} is not one of the {spec.name} labels: {', '.join(labels)}")
    return value


def field_text(value: Any) -> str:
    """A profile field as text: strings as they are, numbers via str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"must be text, got {type_name(value)}")


def extra_text(value: Any) -> str:
    """Fields the task does not use are kept, as text (JSON for structured values)."""
    try:
        return field_text(value)
    except ValueError:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
