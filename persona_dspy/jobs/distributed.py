"""Compiling users on a Ray cluster: batches of users become Ray tasks, each worker process compiles its batch.

``compile_on_ray`` is ``compile_users`` spread over processes (one machine or many). The driver sizes batches,
submits at most ``processes`` of them at a time, shows one progress bar and writes one summary; each worker
process builds its LMs and opens the memory once (cached for the tasks it runs after) and compiles its users on
``config.workers`` threads with ``jobs.compile.compile_user``, the code the threaded compile runs: alignment, the
skip-if-current fingerprint, failure isolation and atomic program files are the same.

- **Batches sized by measurement**: the first tasks carry two users per thread; from their wall time the driver
  sizes later ones to about ``TARGET_TASK_SECONDS`` of work each (Ray's per-task cost, a few milliseconds, is then
  noise), but never more than an even share of the users left, so the processes finish together.
- **Memory**: an Edge folder is opened by every worker in shared mode, for the length of a batch, and each opens
  (and ingests, idempotently) only the users of its batch, so two workers never open one user's store
  (``memory.edge``); a Qdrant server (``url``) needs no such care. ``":memory:"`` cannot be shared between
  processes and is refused.
- **Faults**: a worker process that dies (kill -9, out of memory, a lost node) fails its task; Ray runs it again
  (``TASK_RETRIES`` times) on a live worker, where the users whose programs the dead one already wrote are
  current and skipped (the summary counts them compiled, from their files: ``written_this_run``). A batch still
  failing after that marks its other users failed, so a rerun compiles them. A dead model server is the pool's
  business (``lm.pool``).
- Ray is imported only here and only when called: without ``--ray`` nothing imports it (it is an optional extra).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persona_dspy.console import plural, progress_bar
from persona_dspy.data.records import UserHistory
from persona_dspy.jobs.compile import (
    CompileJob,
    CompileSummary,
    UserResult,
    compile_user,
    finish_summary,
    prepare_compile,
)
from persona_dspy.jobs.compile_config import CompileConfig
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.config import LMConfig
from persona_dspy.lm.redact import redact_text
from persona_dspy.lm.report import describe_lm
from persona_dspy.programs import ProgramFileError, program_path, read_program_metadata

logger = logging.getLogger(__name__)

TARGET_TASK_SECONDS = 20.0
"""Work per Ray task once measured: long against Ray's per-task cost, short enough to balance and to lose little."""
INITIAL_ROUNDS = 2
"""Users per thread in a task before any task has been timed."""
TASK_RETRIES = 3
"""Times Ray reruns a task whose worker process died."""
INTERRUPT_GRACE = 5.0


class RayNotInstalledError(RuntimeError):
    """``--ray`` without the optional extra installed."""


@dataclass(frozen=True)
class MemorySpec:
    """Where every worker finds the memory: an Edge folder they share (each its own users) or a server URL."""

    task: str
    location: str | None = None
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    dense: str | None = None

    def __post_init__(self) -> None:
        if self.url is None and str(self.location) == ":memory:":
            raise ValueError("':memory:' lives in one process; worker processes need a memory folder they can all "
                             "reach (--memory DIR) or a Qdrant server (--qdrant-url)")

    def embedder(self) -> Any:
        from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig

        return Embedder(EmbeddingConfig(sparse=True, dense=self.dense))

    def open(self, embedder: Any = None) -> Any:
        from persona_dspy.memory.episodic import EpisodicMemory

        embedder = embedder or self.embedder()
        if self.url is not None:
            return EpisodicMemory.for_task(self.task, url=self.url, api_key=self.api_key, embedder=embedder)
        return EpisodicMemory.for_task(self.task, self.location, embedder=embedder, shared=True)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides its users: the same for every task of one compile."""

    config: CompileConfig
    lm: LMConfig
    optimizer_lm: LMConfig | None
    memory: MemorySpec


_WORKER_STATE: dict[str, tuple[Any, Any, Any]] = {}
_WORKER_LOCK = threading.Lock()


def _worker_state(spec: WorkerSpec) -> tuple[tuple[Any, Any, Any], float]:
    """This process's (LM, optimizer LM, embedder) for ``spec``: built by its first task, reused by later ones."""
    key = repr((spec, spec.lm.api_key, spec.optimizer_lm and spec.optimizer_lm.api_key))
    with _WORKER_LOCK:
        state = _WORKER_STATE.get(key)
        if state is not None:
            return state, 0.0
        t0 = time.perf_counter()
        optimizer_lm = build_lm(spec.optimizer_lm) if spec.optimizer_lm is not None else None
        state = _WORKER_STATE[key] = (build_lm(spec.lm), optimizer_lm, spec.memory.embedder())
        return state, time.perf_counter() - t0


def compile_batch(spec: WorkerSpec, histories: list[UserHistory]) -> dict[str, Any]:
    """A Ray task's body: ingest (idempotent) and compile these users on the worker's threads.

    The store is opened for the batch and closed after it (opening costs nothing; users' shards open on first
    use), so between batches a worker holds no user's memory and an idle worker holds no lock on the folder.
    """
    from persona_dspy.evaluation.runner import run_users

    started = time.perf_counter()
    (lm, optimizer_lm, embedder), setup = _worker_state(spec)
    results: list[UserResult] = []
    with spec.memory.open(embedder) as memory:
        job = CompileJob.of(spec.memory.task, spec.config, memory, lm, optimizer_lm)

        def one(history: UserHistory) -> UserResult:
            try:
                memory.add(history.user_id, history.items)  # this worker's own users only
            except Exception as exc:
                return UserResult(history.user_id, "failed",
                                  error=redact_text(f"memory: {type(exc).__name__}: {exc}"))
            return compile_user(history, job)

        run_users(histories, one, lambda _, result: results.append(result), workers=spec.config.workers,
                  name="ray-compile")
    return {"results": results, "pid": os.getpid(), "setup_seconds": round(setup, 3),
            "seconds": round(time.perf_counter() - started, 3)}


def batch_size(threads: int, seconds_per_user: float | None, remaining: int, processes: int,
               target: float = TARGET_TASK_SECONDS) -> int:
    """Users for the next task: two per thread until measured, then ~``target`` seconds of work; never more than
    an even share of the users left (so the processes finish together), never fewer than a thread each."""
    if remaining <= 0:
        return 0
    rounds = INITIAL_ROUNDS if seconds_per_user is None else max(1, int(target / max(seconds_per_user, 1e-3)))
    share = -(-remaining // max(processes, 1))
    return max(min(threads, remaining), min(threads * rounds, share))


def written_this_run(history: UserHistory, out: Path, since: datetime) -> UserResult | None:
    """A user whose program a worker of this run saved before it died or was cancelled (so its result never came
    back): "compiled", with the scores the file holds; its LM calls died with the worker and are not counted."""
    path = program_path(out, history.user_id)
    try:
        metadata = read_program_metadata(path)
        created = datetime.fromisoformat(metadata["created"])
    except (OSError, ValueError, KeyError, TypeError, ProgramFileError):
        return None
    if created < since or metadata.get("user_id") != history.user_id:
        return None
    scores = metadata.get("dev_scores") or {}
    return UserResult(history.user_id, "compiled", str(path), scores.get("start"), scores.get("best"))


def connect(address: str | None, processes: int | None) -> tuple[Any, bool]:
    """Ray, initialised: an existing session, the cluster at ``address`` ('auto', 'ray://host:10001'), or a new
    local cluster of ``processes`` CPUs ('local' or None). Returns (ray, whether this call started it)."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError("--ray needs Ray: pip install 'persona-dspy[ray]'") from exc
    if ray.is_initialized():
        return ray, False
    if address in (None, "local"):
        ray.init(num_cpus=processes or os.cpu_count() or 1, include_dashboard=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return ray, True


def compile_on_ray(
    histories: Sequence[UserHistory],
    config: CompileConfig | None = None,
    *,
    lm: LMConfig,
    memory: MemorySpec,
    optimizer_lm: LMConfig | None = None,
    address: str | None = None,
    processes: int | None = None,
    batch: int | None = None,
    progress: bool | None = None,
    interrupt: threading.Event | None = None,
    **settings: Any,
) -> CompileSummary:
    """``compile_users`` over Ray worker processes (module docstring); the summary is the threaded run's, plus
    ``cluster`` (address, processes, threads, batches, start-up and per-task figures).

    ``config`` (or ``settings`` by name) as for ``compile_users``, its ``workers`` the threads of each process;
    ``lm`` and ``optimizer_lm`` are ``LMConfig`` values (each worker builds its LMs from them). ``processes``: tasks
    in flight (default: the cluster's CPUs); ``batch``: users per task (default: sized by measurement).
    """
    config = CompileConfig.of(config, **settings)
    for name, value in (("lm", lm), ("optimizer_lm", optimizer_lm)):
        if value is not None and not isinstance(value, LMConfig):
            raise TypeError(f"{name} must be an LMConfig (lm.config.lm_config(...)): LM objects do not travel to "
                            f"worker processes, their settings do; got {type(value).__name__}")
    task, selected = prepare_compile(histories, config)
    threads = config.workers
    if memory.task != task:
        raise ValueError(f"the memory is {memory.task}'s, the users are {task}'s")
    if memory.url is None:  # no process may hold the folder alone: every worker would fail on it
        probe = memory.open()
        try:
            if not getattr(probe.store, "shared", True):
                raise ValueError(f"this process has the memory folder {memory.location} open for itself; close it "
                                 "before compiling on Ray (the workers open it in shared mode)")
        finally:
            probe.close()
    started = time.perf_counter()
    ray, started_here = connect(address, processes)
    try:
        connected = time.perf_counter() - started
        processes = processes or max(1, int(ray.cluster_resources().get("CPU", 1)))
        spec = WorkerSpec(config, lm, optimizer_lm, memory)
        summary = CompileSummary(task, str(config.out_dir), processes * threads, config.settings,
                                 describe_lm(build_lm(lm)))
        remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(compile_batch)
        cluster = _drive(ray, remote, spec, selected, summary, processes, threads, batch, progress, interrupt)
        cluster.update(address=address or "local", processes=processes, threads_per_process=threads,
                       connect_seconds=round(connected, 3))
        summary.cluster = cluster
    finally:
        if started_here:
            ray.shutdown()
    return finish_summary(summary, selected, started)


def _drive(ray: Any, remote: Any, spec: WorkerSpec, selected: list[UserHistory], summary: CompileSummary,
           processes: int, threads: int, fixed_batch: int | None, progress: bool | None,
           interrupt: threading.Event | None) -> dict[str, Any]:
    """Submit batches, collect results as they come; on interrupt stop submitting, give a grace, cancel the rest."""
    interrupt = interrupt or threading.Event()
    queue = deque(selected)
    in_flight: dict[Any, list[UserHistory]] = {}
    sizes: list[int] = []
    pids: set[int] = set()
    first_result: float | None = None
    setup: list[float] = []
    per_user: float | None = None
    deadline: float | None = None
    since = datetime.now(UTC)
    t0 = time.perf_counter()
    out = spec.config.out_dir
    with progress_bar(len(selected), f"compile {summary.task} (ray)", progress) as bar:
        while queue or in_flight:
            while queue and len(in_flight) < processes and not interrupt.is_set():
                n = fixed_batch or batch_size(threads, per_user, len(queue), processes)
                batch = [queue.popleft() for _ in range(min(n, len(queue)))]
                in_flight[remote.remote(spec, batch)] = batch
                sizes.append(len(batch))
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.2)
            for ref in ready:
                batch = in_flight.pop(ref)
                try:
                    done = ray.get(ref)
                except Exception as exc:  # the task failed on every retry: its users are failed, a rerun does them
                    reason = redact_text(f"worker lost after {TASK_RETRIES} retries: {type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0] if str(exc) else ''}")
                    results = [written_this_run(h, out, since) or UserResult(h.user_id, "failed", error=reason)
                               for h in batch]
                    logger.error("a batch of %s failed: %s", plural(len(batch), "user"), reason)
                else:  # after a retry, the users the dead worker finished come back "skipped": they were compiled
                    by_id = {h.user_id: h for h in batch}
                    results = [(written_this_run(by_id[r.user_id], out, since) or r) if r.status == "skipped" else r
                               for r in done["results"]]
                    pids.add(done["pid"])
                    setup.append(done["setup_seconds"])
                    first_result = first_result or time.perf_counter() - t0
                    work = max(done["seconds"] - done["setup_seconds"], 1e-3)
                    measured = work * min(threads, len(batch)) / max(len(batch), 1)
                    per_user = measured if per_user is None else 0.5 * (per_user + measured)
                summary.results.extend(results)
                bar.update(len(batch))
            if interrupt.is_set():
                if deadline is None:
                    deadline = time.monotonic() + INTERRUPT_GRACE
                    logger.warning("interrupted: starting no new batches; waiting up to %.0f s for %s in flight",
                                   INTERRUPT_GRACE, plural(len(in_flight), "batch", "batches"))
                if in_flight and time.monotonic() >= deadline:
                    for ref, batch in in_flight.items():
                        ray.cancel(ref, force=True)
                        for history in batch:
                            recovered = written_this_run(history, out, since)
                            if recovered is not None:
                                summary.results.append(recovered)
                            else:
                                summary.not_done.append(history.user_id)
                    in_flight.clear()
                if not in_flight:
                    break
    summary.interrupted = interrupt.is_set()
    summary.not_done += [h.user_id for h in queue]
    return {"batches": len(sizes), "batch_sizes": sizes, "worker_processes_used": len(pids),
            "first_batch_seconds": round(first_result, 3) if first_result is not None else None,
            "worker_setup_seconds": round(max(setup), 3) if setup else None,
            "seconds_per_user_per_thread": round(per_user, 3) if per_user is not None else None}
