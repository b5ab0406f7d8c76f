"""Writing files so that a crash leaves the old file or the new one, never a mix.

Program files, reports and summaries all go through ``write_atomically``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); platforms that cannot open a directory skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(directory: Path, prefix: str, data: bytes) -> Path:
    """Write ``data`` to a fsynced temporary file in ``directory`` (same filesystem, so renames are atomic)."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path``'s content with ``data`` so that a crash leaves the old file or the new one, never a mix.

    Temporary file in the same directory, fsynced, ``os.replace``d over ``path``, then the directory fsynced so the
    rename itself survives a power cut. Parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path.parent, f".{path.name}.", data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
