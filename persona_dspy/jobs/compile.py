"""Compiling many users' programs: concurrent, resumable, and safe against crashes.

Each user is aligned on their recent interactions and saved as a program file
(``<out>/<user>.json``, written atomically, earlier versions kept). Users run on worker threads,
each in a copy of the caller's context (so the caller's ``dspy.context`` settings and callbacks see
every call) under its own ``dspy.context``, all against one model server. A user whose file is current
(same task, mode, settings and trainset) is skipped, so a rerun after an interruption continues
where it stopped; a user whose history has new interactions (or whose aligner settings changed) is
re-aligned starting from their saved persona (online re-alignment); a program saved for another
agent ``mode`` or ``k`` is compiled afresh (the old file is kept among the versions). One user's
failure (server errors, timeouts, unparsable outputs after retries) is recorded and the others go
on. A crash loses no program already written: files only ever appear through an atomic rename, and
the temp files a killed run leaves behind are removed by the next one.

Output problems surface before any LM call: the programs folder must be creatable, writable and have
some free space (``UnwritableOutputError``). A save that fails later fails that user with its reason;
the summary is still returned (``summary_error`` says why it could not be written). A user whose
alignment could not answer an item (``AlignmentError``, after retries) fails too: a persona scored on
missing answers is never saved, so the next run compiles that user again.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dspy

from optimizers.lm_usage import LMUsage
from persona_dspy.agent.persona_agent import AgentMode
from persona_dspy.data.records import UserHistory, select_users
from persona_dspy.data.tasks import get_task
from persona_dspy.files import check_writable_dir, write_atomically
from persona_dspy.jobs.alignment import DEFAULT_RECENT, align_user
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.build import describe_lm, redact_text
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.programs import (
    ProgramFileError,
    load_program,
    read_program_metadata,
    remove_stale_temps,
    save_program,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "compile_summary.json"
MIN_FREE_BYTES = 1 << 20
PROGRAM_BYTES = 64 << 10
"""Free space asked for up front: 1 MiB plus 64 KiB per user (a program and its kept version are ~20 KiB each)."""


def program_path(out_dir: Path, user_id: str) -> Path:
    """A file name per user that is safe on any file system and never collides."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", user_id).strip("._")[:60] or "user"
    digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:10]
    return out_dir / f"{readable}-{digest}.json"


def trainset_fingerprint(history: UserHistory, n_recent: int) -> str:
    """What the alignment was trained on: new interactions make a saved program out of date."""
    ids = [item.id for item in history.recent_interactions(n_recent)]
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


@dataclass
class UserResult:
    user_id: str
    status: str  # compiled | realigned | skipped | failed
    path: str | None = None
    start_score: float | None = None
    best_score: float | None = None
    lm_calls: int = 0
    seconds: float = 0.0
    error: str | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)  # replies read as raw text, by step


@dataclass
class CompileSummary:
    task: str
    out_dir: str
    workers: int
    settings: dict[str, Any]
    lm: dict[str, Any] | None
    results: list[UserResult] = field(default_factory=list)
    seconds: float = 0.0
    lm_calls: int = 0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    summary_error: str | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def users_per_minute(self) -> float:
        done = self.count("compiled") + self.count("realigned")
        return 60.0 * done / self.seconds if self.seconds > 0 else 0.0

    def fallbacks(self) -> dict[str, int]:
        """Replies the aligner read as raw text, by step, over every user (``optimizers.text_outputs``)."""
        total: dict[str, int] = {}
        for result in self.results:
            for step, n in result.fallbacks.items():
                total[step] = total.get(step, 0) + n
        return total

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compiled": self.count("compiled"), "realigned": self.count("realigned"),
                "fallbacks": self.fallbacks(),
                "skipped": self.count("skipped"), "failed": self.count("failed"),
                "users_per_minute": round(self.users_per_minute, 2)}

    def table(self) -> str:
        lines = [f"{self.task}: {len(self.results)} users -> {self.out_dir}",
                 f"  compiled {self.count('compiled')}, re-aligned {self.count('realigned')}, "
                 f"skipped (current) {self.count('skipped')}, failed {self.count('failed')}",
                 f"  {self.lm_calls} LM calls, {self.seconds:.1f} s, {self.users_per_minute:.1f} users/min "
                 f"with {self.workers} workers"]
        fallbacks = self.fallbacks()
        if any(fallbacks.values()):
            kept = ", ".join(f"{step} {n}" for step, n in fallbacks.items())
            lines.append(f"  unparsable replies kept as raw text: {kept}")
        for r in self.results:
            if r.status == "failed":
                lines.append(f"  FAILED {r.user_id}: {r.error}")
        if self.summary_error:
            lines.append(f"  summary not written: {self.summary_error}")
        return "\n".join(lines)


def _current(path: Path, history: UserHistory, expected: dict[str, Any]) -> bool | None:
    """True: up to date; False: stale but loadable (warm start); None: compile afresh.

    Afresh when the file is absent, unreadable, another user's or task's, or built for another agent ``mode`` or
    ``k``: loading it would rebuild that agent, whose metadata then conflicts with the one asked for. Only a new
    trainset or new ``alignment_settings`` warm-start from the saved persona.
    """
    if not path.exists():
        return None
    try:
        metadata = read_program_metadata(path)
    except ProgramFileError as exc:
        logger.warning("ignoring unreadable program %s: %s", path, exc)
        return None
    if metadata.get("user_id") != history.user_id or metadata.get("task") != history.task:
        return None
    if any(metadata.get(key) != expected[key] for key in ("mode", "k")):
        return None
    return all(metadata.get(key) == value for key, value in expected.items())


def compile_users(
    histories: Sequence[UserHistory],
    *,
    memory: EpisodicMemory,
    out_dir: str | Path,
    lm: dspy.LM,
    optimizer_lm: dspy.LM | None = None,
    mode: AgentMode = "rag",
    k: int = 5,
    n_recent: int = DEFAULT_RECENT,
    workers: int = 4,
    users: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    **aligner_settings: Any,
) -> CompileSummary:
    """Align and save every selected user's program (see module docstring)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not histories:
        raise ValueError("no users to compile")
    task = histories[0].task
    if get_task(task).label_field is None:
        raise ValueError(f"{task} history items carry no answer (LaMP-1 papers, LaMP-7 tweets), so there is nothing "
                         f"to align a persona on; evaluate the initial persona with `persona-dspy eval` instead")
    out = Path(out_dir)
    selected = select_users(histories, users)
    check_writable_dir(out, MIN_FREE_BYTES + PROGRAM_BYTES * len(selected))  # before any LM call is spent
    remove_stale_temps(out)
    settings = {"mode": mode, "k": k, "n_recent": n_recent, **aligner_settings}
    summary = CompileSummary(task, str(out), workers, settings, describe_lm(lm))
    started = time.perf_counter()

    def run(history: UserHistory) -> UserResult:
        path = program_path(out, history.user_id)
        expected = {"mode": mode, "k": k, "alignment_settings": settings,
                    "trainset": trainset_fingerprint(history, n_recent)}
        state = None if force else _current(path, history, expected)
        if state is True:
            return UserResult(history.user_id, "skipped", str(path))
        t0 = time.perf_counter()
        calls = LMUsage()
        try:
            with dspy.context(lm=lm, adapter=default_adapter(), callbacks=[*dspy.settings.get("callbacks", []), calls]):
                start = load_program(path, memory, user_id=history.user_id, task=task) if state is False else None
                aligned = align_user(history, memory, mode=mode, k=k, n_recent=n_recent, optimizer_lm=optimizer_lm,
                                     start=start, **aligner_settings)
            report = aligned.alignment
            started_from = ({"program_created": start.program_metadata["created"], "persona": start.persona}
                            if start is not None else {"initial_persona": aligned.persona_history[0]["persona"]})
            try:
                save_program(aligned, path, {
                    **expected, "optimizer": "PersonaAligner", "alignment": report, "started_from": started_from,
                    "dev_scores": {"start": report["start_score"], "best": report["best_score"]},
                }, lm=lm)
            except OSError as exc:
                raise OSError(f"cannot save the program to {path}: {exc.strerror or exc}") from exc
            return UserResult(history.user_id, "realigned" if state is False else "compiled", str(path),
                              report["start_score"], report["best_score"], calls.calls,
                              round(time.perf_counter() - t0, 3), fallbacks=dict(report.get("fallbacks", {})))
        except Exception as exc:  # one user's failure must not stop the others
            logger.debug("user %s failed:\n%s", history.user_id, traceback.format_exc())
            return UserResult(history.user_id, "failed", None, lm_calls=calls.calls,
                              seconds=round(time.perf_counter() - t0, 3),
                              error=redact_text(f"{type(exc).__name__}: {exc}"))

    bar = _progress(len(selected), f"compile {task}", progress)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile") as pool:
        # dspy.context lives in contextvars, which worker threads do not inherit: each user runs in a copy.
        futures = {pool.submit(contextvars.copy_context().run, run, h): h.user_id for h in selected}
        for future in as_completed(futures):
            summary.results.append(future.result())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    order = {h.user_id: i for i, h in enumerate(selected)}
    summary.results.sort(key=lambda r: order[r.user_id])
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.lm_calls = sum(r.lm_calls for r in summary.results)  # every call is made inside one user's run
    try:
        write_atomically(out / SUMMARY_FILE, json.dumps(summary.as_dict(), indent=2, default=str).encode("utf-8"))
    except OSError as exc:  # the results are still returned (and printed by the CLI)
        summary.summary_error = f"cannot write {out / SUMMARY_FILE}: {exc.strerror or exc}"
        logger.error("%s", summary.summary_error)
    return summary


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="user")
