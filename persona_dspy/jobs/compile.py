"""Compiling many users' programs: concurrent, resumable, and safe against crashes.

Each user is aligned on their recent interactions and saved as a program file, written atomically. Users run on
worker threads against one model server; a user whose file is current is skipped, new interactions re-align from
the saved persona, and one user's failure is recorded while the others go on. A persona scored on missing or
invalid outputs is never saved: the user fails with the reason and their previous file stays. Output problems
(an unwritable programs folder) surface before any LM call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dspy

from persona_dspy.agent.persona_agent import DEFAULT_MODE, AgentMode
from persona_dspy.console import plural, progress_bar
from persona_dspy.data.records import UserDataError, UserHistory, select_users
from persona_dspy.data.tasks import get_task
from persona_dspy.evaluation.output_counts import counts_line, invalid_warning
from persona_dspy.evaluation.progress import RunProgress
from persona_dspy.evaluation.runner import run_users
from persona_dspy.files import check_writable_dir, write_atomically
from persona_dspy.jobs.alignment import DEFAULT_RECENT, align_user, persona_problem
from persona_dspy.jobs.compile_config import CompileConfig
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.budget import overflow_sizes
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.config import LMConfig
from persona_dspy.lm.redact import redact_text
from persona_dspy.lm.report import describe_lm
from persona_dspy.lm.usage import LMUsage, counting
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.outputs.validation import OutputStats
from persona_dspy.programs import (
    ProgramFileError,
    load_program,
    program_path,
    read_program_metadata,
    remove_stale_temps,
    save_program,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "compile_summary.json"
MIN_FREE_BYTES = 1 << 20
PROGRAM_BYTES = 64 << 10
"""Free space asked for up front: 1 MiB plus 64 KiB per user (a program and its kept version are ~20 KiB each)."""


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
    requests: int = 0  # HTTP requests sent for this user, retries and hedges included (``LMUsage.requests``)
    fallbacks: dict[str, int] = field(default_factory=dict)  # replies read as raw text, by step
    run: str | None = None  # the ``created`` time of the run that produced this result
    outputs: dict[str, Any] = field(default_factory=dict)  # OutputStats.snapshot() of this user's calls
    data_error: bool = False  # failed because of the user's records (``UserDataError``), not the model


class PersonaRejected(ValueError):
    """An aligned program that must not be saved (``alignment.persona_problem`` says why)."""


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
    requests: int = 0
    """Every HTTP request sent, retries and hedges included (``lm_calls`` counts each call once)."""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    summary_error: str | None = None
    interrupted: bool = False
    not_done: list[str] = field(default_factory=list)
    """Users this run did not finish (interrupted before they started, or abandoned mid-run): a rerun does them."""
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every user any run into this folder recorded, with their latest result (``merge_earlier``)."""
    run_outputs: dict[str, Any] = field(default_factory=dict)
    """This run's output counts (``OutputStats.snapshot()``) counted as the calls were made, users not finished
    included; empty where only the finished users' counts are known (Ray)."""
    cluster: dict[str, Any] | None = None
    """A run on Ray (``jobs.distributed``): address, processes, threads each, batches, start-up figures."""

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def users_per_minute(self) -> float:
        done = self.count("compiled") + self.count("realigned")
        return 60.0 * done / self.seconds if self.seconds > 0 else 0.0

    def fallbacks(self) -> dict[str, int]:
        """Replies the aligner read as raw text, by step, over every user (``persona_dspy.outputs.text``)."""
        total: dict[str, int] = {}
        for result in self.results:
            for step, n in result.fallbacks.items():
                total[step] = total.get(step, 0) + n
        return total

    def output_totals(self) -> dict[str, Any]:
        """This run's output counts: as counted during the run, else every finished user's, summed."""
        if self.run_outputs:
            return dict(self.run_outputs)
        totals = OutputStats()
        for result in self.results:
            totals.merge(result.outputs)
        return totals.snapshot()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compiled": self.count("compiled"), "realigned": self.count("realigned"),
                "fallbacks": self.fallbacks(), "output_totals": self.output_totals(),
                "skipped": self.count("skipped"), "failed": self.count("failed"),
                "users_per_minute": round(self.users_per_minute, 2)}

    def merge_earlier(self, path: Path) -> None:
        """Fill ``users`` from the summary an earlier run left at ``path`` and this run's results.

        A result of this run replaces the earlier one, except "skipped" (the program is the one the earlier run
        recorded, with its scores); users this run did not touch keep their earlier entry.
        """
        earlier: dict[str, dict[str, Any]] = {}
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("task") == self.task:
                earlier = dict(document.get("users") or {})
                for result in document.get("results") or []:  # a summary written before ``users`` existed
                    earlier.setdefault(result["user_id"], {**result, "run": result.get("run") or
                                                           document.get("created")})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("earlier summary %s is unreadable (%s); it is replaced by this run's", path, exc)
        self.users = earlier
        for result in self.results:
            if result.status != "skipped" or result.user_id not in self.users:
                self.users[result.user_id] = {**asdict(result), "run": self.created}

    def table(self) -> str:
        lines = [f"{self.task}: {plural(len(self.results), 'user')} -> {self.out_dir}",
                 f"  compiled {self.count('compiled')}, re-aligned {self.count('realigned')}, "
                 f"skipped (current) {self.count('skipped')}, failed {self.count('failed')}",
                 f"  {self.lm_calls} LM calls ({self.requests} HTTP requests), {self.seconds:.1f} s, "
                 f"{self.users_per_minute:.1f} users/min "
                 f"with {plural(self.workers, 'worker')}"]
        if self.cluster:
            ray = self.cluster
            processes = plural(ray["processes"], "process", "processes")
            lines.append(f"  on Ray ({ray['address']}): {processes} x {plural(ray['threads_per_process'], 'thread')}"
                         f", {plural(ray['batches'], 'batch', 'batches')}")
        fallbacks = self.fallbacks()
        if any(fallbacks.values()):
            kept = ", ".join(f"{step} {n}" for step, n in fallbacks.items())
            lines.append(f"  unparsable replies kept as raw text: {kept}")
        totals = self.output_totals()
        lines.append(f"  {counts_line(totals)}")
        warning = invalid_warning(totals)
        if warning:
            lines.append(f"  WARNING: {warning}")
        for r in self.results:
            if r.status == "failed":
                lines.append(f"  FAILED {r.user_id}: {r.error}")
        if self.summary_error:
            lines.append(f"  summary not written: {self.summary_error}")
        if self.interrupted:
            lines.append(f"  INTERRUPTED: {plural(len(self.not_done), 'user')} not done; a rerun continues with "
                         "them (finished users are skipped)")
        return "\n".join(lines)


def _sizes(exc: BaseException) -> str:
    """The prompt and context sizes of a context overflow, which litellm leaves out of its message ("" if none)."""
    sizes = overflow_sizes(exc)
    return f" ({sizes.partition(':')[0]})" if sizes else ""


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


@dataclass(frozen=True)
class CompileJob:
    """What every user of one compile shares: the task, where programs go, LMs, memory and settings.

    ``compile_users`` builds one for its threads; each worker process of ``jobs.distributed`` builds its own.
    """

    task: str
    out: Path
    memory: EpisodicMemory
    lm: dspy.LM
    optimizer_lm: dspy.LM | None = None
    mode: AgentMode = DEFAULT_MODE
    k: int = 5
    n_recent: int = DEFAULT_RECENT
    force: bool = False
    aligner_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, task: str, config: CompileConfig, memory: EpisodicMemory, lm: dspy.LM,
           optimizer_lm: dspy.LM | None) -> CompileJob:
        return cls(task, config.out_dir, memory, lm, optimizer_lm, config.mode, config.k, config.n_recent,
                   config.force, dict(config.aligner_settings))

    @property
    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "k": self.k, "n_recent": self.n_recent, **self.aligner_settings}


def compile_user(history: UserHistory, job: CompileJob) -> UserResult:
    """Align and save one user's program, or skip it when current; never raises (a failure is the result)."""
    path = program_path(job.out, history.user_id)
    expected = {"mode": job.mode, "k": job.k, "alignment_settings": job.settings,
                "trainset": trainset_fingerprint(history, job.n_recent)}
    state = None if job.force else _current(path, history, expected)
    if state is True:
        return UserResult(history.user_id, "skipped", str(path))
    t0 = time.perf_counter()
    calls, stats = LMUsage(), OutputStats()
    try:
        with dspy.context(lm=job.lm, adapter=default_adapter()), counting(calls, stats):
            start = (load_program(path, job.memory, user_id=history.user_id, task=job.task)
                     if state is False else None)
            aligned = align_user(history, job.memory, mode=job.mode, k=job.k, n_recent=job.n_recent,
                                 optimizer_lm=job.optimizer_lm, start=start, **job.aligner_settings)
        report = aligned.alignment
        problem = persona_problem(aligned, stats.snapshot(), warm_start=start is not None)
        if problem is not None:
            kept = " (the previous program file is kept)" if path.exists() else ""
            raise PersonaRejected(f"not saved: {problem}{kept}")
        started_from = ({"program_created": start.program_metadata["created"], "persona": start.persona}
                        if start is not None else {"initial_persona": aligned.persona_history[0]["persona"]})
        try:
            save_program(aligned, path, {
                **expected, "optimizer": "PersonaAligner", "alignment": report, "started_from": started_from,
                "outputs": stats.snapshot(),
                "dev_scores": {"start": report["start_score"], "best": report["best_score"]},
            }, lm=job.lm)
        except OSError as exc:
            raise OSError(f"cannot save the program to {path}: {exc.strerror or exc}") from exc
        return UserResult(history.user_id, "realigned" if state is False else "compiled", str(path),
                          report["start_score"], report["best_score"], calls.calls,
                          round(time.perf_counter() - t0, 3), fallbacks=dict(report.get("fallbacks", {})),
                          outputs=stats.snapshot(), requests=calls.requests)
    except Exception as exc:  # one user's failure must not stop the others
        logger.debug("user %s failed:\n%s", history.user_id, traceback.format_exc())
        return UserResult(history.user_id, "failed", None, lm_calls=calls.calls, requests=calls.requests,
                          seconds=round(time.perf_counter() - t0, 3),
                          error=redact_text(f"{type(exc).__name__}: {exc}" + _sizes(exc)), outputs=stats.snapshot(),
                          data_error=isinstance(exc, UserDataError))


def prepare_compile(histories: Sequence[UserHistory], config: CompileConfig) -> tuple[str, list[UserHistory]]:
    """The task and selected users, once the programs folder is proven usable (before any LM call is spent)."""
    if not histories:
        raise ValueError("no users to compile")
    task = histories[0].task
    if get_task(task).label_field is None:
        raise ValueError(f"{task} history items carry no answer (LaMP-1 papers, LaMP-7 tweets), so there is nothing "
                         f"to align a persona on; evaluate the initial persona with `persona-dspy eval` instead")
    selected = select_users(histories, config.users)
    check_writable_dir(config.out_dir, MIN_FREE_BYTES + PROGRAM_BYTES * len(selected))
    remove_stale_temps(config.out_dir)
    return task, selected


def finish_summary(summary: CompileSummary, selected: Sequence[UserHistory], started: float,
                   lm_calls: int | None = None) -> CompileSummary:
    """Order the results as the users were given, total them, and write the summary file (merged with earlier runs).

    ``lm_calls``: the calls this run made, users not finished included; default: the finished users' sum."""
    out = Path(summary.out_dir)
    order = {h.user_id: i for i, h in enumerate(selected)}
    summary.results.sort(key=lambda r: order[r.user_id])
    summary.seconds = round(time.perf_counter() - started, 3)
    finished = sum(r.lm_calls for r in summary.results)
    summary.lm_calls = finished if lm_calls is None else max(lm_calls, finished)  # unfinished users' calls too
    summary.requests = sum(r.requests for r in summary.results)
    try:
        summary.merge_earlier(out / SUMMARY_FILE)
        write_atomically(out / SUMMARY_FILE, json.dumps(summary.as_dict(), indent=2, default=str).encode("utf-8"))
    except OSError as exc:  # the results are still returned (and printed by the CLI)
        summary.summary_error = f"cannot write {out / SUMMARY_FILE}: {exc.strerror or exc}"
        logger.error("%s", summary.summary_error)
    return summary


def _status(bar: Any, users: int, workers: int, n_recent: int, settings: dict[str, Any]) -> RunProgress:
    """The run's status line: a pass of answers is the held-back slice of the recent interactions, a step's losses
    its feedback batch (``alignment.split_recent``); a user's calls are at most a summary, one pass, and per iteration
    the batch's answers and losses, the updates and a pass per candidate (``PersonaAligner``'s defaults where a
    setting is not given)."""
    held = (n_recent + 1) // 2 if n_recent >= 2 else n_recent
    batch = min(settings.get("batch_size") or 3, max(1, n_recent - held))
    candidates, iterations = settings.get("candidates_per_step") or 1, settings.get("iterations", 3)
    bound = 1 + held + iterations * (2 * batch + candidates + candidates * held)
    return RunProgress(bar, users=users, workers=workers, per_pass={"answer": held, "loss": batch},
                       calls_bound=bound)


def compile_users(
    histories: Sequence[UserHistory],
    config: CompileConfig | None = None,
    *,
    memory: EpisodicMemory,
    lm: dspy.LM | LMConfig,
    optimizer_lm: dspy.LM | LMConfig | None = None,
    progress: bool | None = None,
    interrupt: threading.Event | None = None,
    **settings: Any,
) -> CompileSummary:
    """Align and save every selected user's program on ``config.workers`` threads (see module docstring).

    ``config``: a ``CompileConfig``; ``settings`` by name (``out_dir``, ``workers``, ``k``, ``iterations``...)
    make or change one. ``lm`` and ``optimizer_lm`` are LMs or their ``LMConfig`` (built here).

    ``interrupt`` (set on Ctrl-C/SIGTERM): no new user starts, those in flight get a few seconds, and the summary
    records what completed (``interrupted``, ``not_done``); the summary file keeps earlier runs' users.
    """
    config = CompileConfig.of(config, **settings)
    task, selected = prepare_compile(histories, config)
    lm = build_lm(lm) if isinstance(lm, LMConfig) else lm
    optimizer_lm = build_lm(optimizer_lm) if isinstance(optimizer_lm, LMConfig) else optimizer_lm
    job = CompileJob.of(task, config, memory, lm, optimizer_lm)
    summary = CompileSummary(task, str(config.out_dir), config.workers, config.settings, describe_lm(lm))
    started = time.perf_counter()
    run_outputs = OutputStats()  # every call of this run, unfinished users' included: an interrupted run says so
    with progress_bar(len(selected), f"compile {task}", progress) as bar, \
            _status(bar, len(selected), config.workers, config.n_recent, config.aligner_settings) as status, \
            counting(run_outputs, status):
        def done(history: UserHistory, result: UserResult) -> None:
            summary.results.append(result)
            bar.update(1)
            logger.info("user %s: %s", result.user_id, result.status)

        def work(history: UserHistory) -> UserResult:
            status.start_user(history.user_id)
            try:
                return compile_user(history, job)
            finally:
                status.finish_user()

        outcome = run_users(selected, work, done, workers=config.workers, interrupt=interrupt, name="compile")
    summary.interrupted = outcome.interrupted
    summary.not_done = [h.user_id for h in (*outcome.abandoned, *outcome.not_started)]
    summary.run_outputs = run_outputs.snapshot()
    return finish_summary(summary, selected, started, run_outputs.calls)
