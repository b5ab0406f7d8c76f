"""Plain-text tables for the command line and the benchmark scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
    """Rows of dicts as aligned columns (all keys in first-seen order unless ``columns`` is given)."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(c for r in rows for c in r))

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)
