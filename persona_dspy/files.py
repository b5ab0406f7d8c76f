"""Writing files so that a crash leaves the old file or the new one, never a mix.

Program files, reports and summaries all go through ``write_atomically``. Its temporary files are named after the
process writing them (``.<name>.pid<pid>@<host>.<random>.tmp``), so a later run can tell the leftovers of a killed
writer (``remove_stale_temp_files``) from the file another live process is writing right now.
``check_writable_dir`` proves a folder usable before a job spends any work on filling it. ``keep_version`` copies a
file into its sibling ``<name>.versions/`` folder before it is replaced, so nothing written is ever lost.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_FOREIGN_SECONDS = 3600.0
"""A temp file from another host (shared storage) or of an unknown writer is stale after this long."""

_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}
_VERSION_NAME = re.compile(r"^(?P<stamp>\d{8}T\d{6}\.\d{6}Z)(?:-(?P<counter>\d+))?\.json$")
_TEMP_NAME = re.compile(r"^\..+?(?:\.pid(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*))?\.[A-Za-z0-9_]+\.tmp$")


class UnwritableOutputError(ValueError):
    """An output folder that cannot be created or written, or lacks free space; the message says which and why."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _writer_tag() -> str:
    return f"pid{os.getpid()}@{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files that an interrupted ``write_atomically`` left in ``directory``; returns what was removed.

    A temp file is stale when its writer (pid on this host) is gone, or, from another host or an older naming,
    when it is older than ``STALE_FOREIGN_SECONDS``. Files another live writer owns are left alone.
    """
    folder = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = match.group("pid")
        if pid is not None and match.group("host") == host:
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            try:
                stale = now - entry.stat().st_mtime > STALE_FOREIGN_SECONDS
            except OSError:
                continue
        if stale:
            try:
                entry.unlink()
                removed.append(entry)
            except OSError as exc:
                logger.warning("cannot remove the stale temp file %s: %s", entry, exc)
    if removed:
        logger.info("removed %d temp file(s) an interrupted write left in %s", len(removed), folder)
    return removed


def check_writable_dir(directory: str | os.PathLike[str], min_free_bytes: int = 1 << 20) -> Path:
    """Create ``directory`` if needed and prove it writable, with ``min_free_bytes`` free; else UnwritableOutputError.

    A probe file is written, fsynced and removed, so a read-only mount, a missing permission or a full disk shows
    up here rather than after a job has spent its work.
    """
    folder = Path(directory).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnwritableOutputError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise UnwritableOutputError(f"the output folder {folder} is not a folder")
    try:
        probe = write_temp(folder, ".write-check.", b"persona-dspy write check\n")
        probe.unlink()
    except OSError as exc:
        raise UnwritableOutputError(f"cannot write in the output folder {folder}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise UnwritableOutputError(f"the output folder {folder} has {free} bytes free, fewer than the "
                                    f"{min_free_bytes} this job needs ({os.strerror(errno.ENOSPC)})")
    return folder


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
    fd, name = tempfile.mkstemp(dir=directory, prefix=f"{prefix}{_writer_tag()}.", suffix=".tmp")
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


def versions_dir(path: str | os.PathLike[str]) -> Path:
    """The sibling folder that keeps earlier versions of ``path``: ``<name>.versions/``."""
    path = Path(path)
    return path.with_name(path.name + ".versions")


def keep_version(path: Path, stamp_of: Callable[[bytes, Path], str]) -> Path | None:
    """Copy the current file into its versions folder (atomically, never over another version) before replacing.

    ``stamp_of(data, path)`` names the copy (a UTC time ``YYYYmmddTHHMMSS.ffffffZ``; ``-1``, ``-2`` ... follow when
    that name holds another file). None when there is no file yet.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    folder = versions_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = stamp_of(data, path)
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


def kept_versions(path: str | os.PathLike[str]) -> list[Path]:
    """The versions ``keep_version`` kept of ``path``, oldest first (empty if it was never replaced)."""
    folder = versions_dir(path)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _VERSION_NAME.match(entry.name)
        if match and entry.is_file():
            found.append((match["stamp"], int(match["counter"] or 0), entry))
    return [entry for _, _, entry in sorted(found)]


def home() -> Path:
    """``$PERSONA_DSPY_HOME`` (default ``~/.persona_dspy``): memory, programs, reports and models live under it."""
    return Path(os.environ.get("PERSONA_DSPY_HOME") or Path.home() / ".persona_dspy").expanduser()
