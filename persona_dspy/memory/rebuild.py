"""Rebuilding a task's memory beside the old one and swapping it in, so a killed rebuild loses nothing.

``memory rebuild`` re-ingests users (after the embeddings changed, say). Deleting each user and ingesting again left
a user with nothing stored when the process died in between. Here the new memory of the whole namespace is built in
a staging folder inside the memory folder (``.rebuild-<namespace>``, a store of its own), users not being rebuilt
are linked into it as they are (hard links: no shard is written out again), and the two namespace folders are
exchanged in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``): a kill at any moment leaves either the old
memory or the new one, whole. The staging folder, holding the old memory after the swap, is removed last; a later
rebuild removes any that a kill left behind. Where the exchange is not available (another OS), two renames stand
in, with a window of a few microseconds in which the namespace folder is missing (``swap_folders`` says how to
recover from it).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from persona_dspy.data.records import UserHistory
from persona_dspy.files import fsync_dir
from persona_dspy.memory.edge import EDGE_DIR, USER_FILE, EdgeStore
from persona_dspy.memory.embeddings import EmbeddingConfig
from persona_dspy.memory.episodic import EpisodicMemory, close_store, open_store, task_namespace

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_folder(folder: Path, namespace: str) -> Path:
    """Where the new memory of ``namespace`` is built: a store of its own inside the memory folder."""
    return folder / f".rebuild-{namespace}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def swap_folders(current: Path, new: Path) -> None:
    """Put ``new`` where ``current`` is and ``current`` where ``new`` was (``current`` may not exist yet).

    Without an atomic exchange: ``current`` -> ``current.swap``, ``new`` -> ``current``, ``current.swap`` -> ``new``; a
    kill between the first two leaves ``current.swap`` (the old memory, whole), which a rebuild restores first.
    """
    if not current.exists():
        new.rename(current)
    elif not _exchange(current, new):
        aside = current.with_name(current.name + ".swap")
        current.rename(aside)
        new.rename(current)
        aside.rename(new)
    fsync_dir(current.parent)
    fsync_dir(new.parent)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link: a shard's preallocated files are sparse (~150 MB apparent), and a copy would write them out.

    Nothing writes to either name while the rebuild holds the folder lock, and the old name is removed after the
    swap (or, after a kill before it, the staging one), so the two never diverge while both are kept."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _restore_interrupted_swap(current: Path) -> None:
    aside = current.with_name(current.name + ".swap")
    if aside.exists() and not current.exists():
        logger.warning("restoring %s from an interrupted swap", current)
        aside.rename(current)


def rebuild_memory(folder: Path, task: str, histories: Sequence[UserHistory], embedding: EmbeddingConfig,
                   ingest: Callable[[EpisodicMemory, list[UserHistory]], int]) -> int:
    """Rebuild the task's memory in the Edge store at ``folder`` (module docstring): ``histories``' users afresh
    with ``ingest(memory, histories)``, every other stored user copied as is. Returns the users kept as they were.

    The store's folder lock is held throughout, so no other process uses the memory while it is rebuilt.
    """
    namespace = task_namespace(task)
    store = open_store(folder)
    try:
        if not isinstance(store, EdgeStore):
            raise TypeError("rebuild_memory swaps Edge folders; a Qdrant server is rebuilt in place")
        current = store.root / namespace
        _restore_interrupted_swap(current)
        staging = staging_folder(folder, namespace)
        shutil.rmtree(staging, ignore_errors=True)  # what a killed rebuild left, or the old memory of the last one
        with EpisodicMemory.for_task(task, staging, embedding=embedding) as fresh:
            ingest(fresh, list(histories))
        fresh_root = staging / EDGE_DIR / namespace
        rebuilt = {h.user_id for h in histories}
        kept = 0
        for user_dir in sorted(current.glob(f"*/{USER_FILE}")) if current.is_dir() else []:
            if user_dir.read_text(encoding="utf-8") not in rebuilt:
                shutil.copytree(user_dir.parent, fresh_root / user_dir.parent.name, copy_function=_link_or_copy)
                kept += 1
        fresh_root.mkdir(parents=True, exist_ok=True)
        swap_folders(current, fresh_root)
        logger.info("swapped in the rebuilt %s memory (%d users rebuilt, %d kept)", namespace, len(rebuilt), kept)
    finally:
        close_store(store)
    shutil.rmtree(staging, ignore_errors=True)
    return kept

