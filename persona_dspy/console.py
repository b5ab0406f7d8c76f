"""What the package prints: counts in words and progress bars, one rule for each."""

from __future__ import annotations

from typing import Any


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 user"``, ``"3 users"``: every count the package prints goes through here, so none reads "1 users"."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def show_progress(progress: bool | None) -> bool:
    """The one rule for progress bars: as asked (``--progress/--no-progress``), else on a terminal only."""
    if progress is not None:
        return progress
    import sys

    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "user") -> Any:
    """A tqdm bar on stderr following ``show_progress`` (a disabled bar when off, so callers need no branches)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(progress), dynamic_ncols=True)
