"""Plain-text tables for the command line, the reports and the benchmark scripts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 3,
                 formats: Mapping[str, str] | None = None, missing: str = "", align_numbers_right: bool = False,
                 rule: bool = False, footer: Sequence[Mapping[str, Any]] = ()) -> str:
    """Rows of dicts as aligned columns (all keys in first-seen order unless ``columns`` is given).

    Floats get ``digits`` decimals unless ``formats`` names a format spec for their column (e.g. ``{"s": ".2f"}``);
    absent or None values print as ``missing``. ``align_numbers_right`` right-aligns the columns (header included)
    whose values are all numbers, so that decimals line up. ``rule`` draws a dashed line under the header;
    ``footer`` rows (totals) come last, set apart by such a line, in the same columns.
    """
    every = [*rows, *footer]
    columns = list(columns) if columns is not None else list(dict.fromkeys(c for r in every for c in r))
    formats = formats or {}

    def cell(column: str, value: Any) -> str:
        if value is None:
            return missing
        if _is_number(value) and column in formats:
            return format(value, formats[column])
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    def numeric(column: str) -> bool:
        return align_numbers_right and all(_is_number(r[column]) for r in every if r.get(column) is not None)

    right = [numeric(c) for c in columns]
    cells = [[cell(c, r.get(c)) for c in columns] for r in every]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
        return "  ".join(padded).rstrip()

    dashes = line(["-" * w for w in widths])
    lines = [line(columns), *([dashes] if rule else []), *(line(row) for row in cells[:len(rows)])]
    if footer:
        lines += [dashes, *(line(row) for row in cells[len(rows):])]
    return "\n".join(lines)
