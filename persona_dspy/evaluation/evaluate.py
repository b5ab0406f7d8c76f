"""Evaluation of PersonaAgent over LaMP users: per-user agents in parallel, LaMP metrics, a JSON report.

Each user gets their own agent and answers their test queries within each query's leak-free scope; users run in a
thread pool, LM calls and tokens are counted across threads, and validated outputs are counted per user. A user
whose agent raises is recorded as a failure and scored nowhere, so one bad user never costs the others their
results. Numbers from the offline stand-in LM are plumbing checks, never a model's score; reports say so.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import dspy

from persona_dspy.agent.persona_agent import DEFAULT_MODE, MODES, AgentMode, PersonaAgent
from persona_dspy.agent.semantic_memory import initial_agent
from persona_dspy.console import plural, progress_bar
from persona_dspy.data.examples import query_examples
from persona_dspy.data.records import UserHistory, common_task
from persona_dspy.evaluation.metrics import aggregate_by_user, metric_keys, per_example_score, primary_metric
from persona_dspy.evaluation.output_counts import counts_line, invalid_warning
from persona_dspy.evaluation.progress import RunProgress
from persona_dspy.evaluation.runner import run_users
from persona_dspy.evaluation.tables import format_table
from persona_dspy.files import write_atomically
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.budget import PromptTooLong, overflow_sizes
from persona_dspy.lm.redact import redact_text
from persona_dspy.lm.report import describe_lm, is_offline
from persona_dspy.lm.usage import LMUsage, counting
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.outputs.validation import OutputStats
from persona_dspy.outputs.validation import record as record_output

logger = logging.getLogger(__name__)

OFFLINE_NOTE = "offline stand-in: a plumbing check, not a model's score"

AgentFactory = Callable[[UserHistory], Any]
"""history -> a program called as ``agent(query=..., scope=...)`` returning a Prediction with ``.answer``.

It is called inside the worker, under the run's LM context, so it may call the LM (the persona summary does)."""


@dataclass(frozen=True)
class PredictionRecord:
    """One answered query: what the agent said, as scored and as the model wrote it, against the gold."""

    user_id: str
    query_id: str
    prediction: str
    raw_answer: str
    gold: str
    score: float
    passage_ids: tuple[str, ...] = ()
    invalid: str | None = None
    """Why the answer was invalid (rejected by validation, an unparsable tool step, a prompt that cannot fit)."""
    context_fit: dict[str, Any] | None = None
    """What was dropped or shortened of the retrieved passages to fit the model's context (``lm.budget``)."""


@dataclass(frozen=True)
class UserFailure:
    """A user whose run raised: where (``stage``: persona or a query id) and what, so it can be reproduced."""

    user_id: str
    error_type: str
    error: str
    stage: str
    n_queries: int


@dataclass
class EvalReport:
    """The outcome of one evaluation run, complete enough to be compared with another run later."""

    task: str
    mode: str
    k: int
    overall: dict[str, float]
    per_user: dict[str, dict[str, float]]
    predictions: list[PredictionRecord]
    failures: list[UserFailure]
    skipped_users: list[str]
    lm: dict[str, Any]
    offline: bool
    note: str | None
    calls: int
    tokens: dict[str, Any]
    wall_seconds: float
    workers: int
    n_users: int
    n_queries: int
    primary_metric: str
    higher_is_better: bool
    versions: dict[str, str]
    created: str
    dataset: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    agents: dict[str, str] = field(default_factory=dict)
    """Per user, what answered: ``"initial"`` (persona summarised now) or the compiled program file's path."""
    vs_initial: dict[str, Any] | None = None
    """The same users answered with the initial persona (``eval --vs-initial``): overall, per_user, calls."""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per user: LM calls, truncations, outputs checked/invalid/retried/read as raw text by step (OutputStats)."""
    output_totals: dict[str, Any] = field(default_factory=dict)
    """The same counts over every user."""

    @property
    def n_invalid(self) -> int:
        return sum(r.invalid is not None for r in self.predictions)

    @property
    def n_scored(self) -> int:
        return len(self.predictions)

    @property
    def complete(self) -> bool:
        """Whether every user was evaluated (no failures, nothing skipped)."""
        return not self.failures and not self.skipped_users

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_scored"] = self.n_scored
        return data

    def to_json(self, path: str | Path) -> Path:
        """Write the report as indented JSON, atomically (parent folders are created); returns the path."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        return write_atomically(Path(path).expanduser(), text.encode("utf-8"))

    def summary_table(self) -> str:
        """A printable table: one row per user, the pooled row LaMP reports, then failures and costs."""
        keys = list(self.overall) or metric_keys(self.task)
        counts: dict[str, int] = {}
        for record in self.predictions:
            counts[record.user_id] = counts.get(record.user_id, 0) + 1
        invalid: dict[str, int] = {}
        for record in self.predictions:
            invalid[record.user_id] = invalid.get(record.user_id, 0) + (record.invalid is not None)
        rows = [{"user": user, "queries": counts.get(user, 0), "invalid": invalid.get(user, 0), **metrics}
                for user, metrics in self.per_user.items()]
        pooled = {"user": f"ALL ({plural(len(self.per_user), 'user')}, pooled)", "queries": self.n_scored,
                  "invalid": self.n_invalid, **self.overall}
        table = format_table(rows, ["user", "queries", "invalid", *keys], digits=4, missing="-",
                             align_numbers_right=True, rule=True, footer=[pooled])
        direction = "higher" if self.higher_is_better else "lower"
        out = [f"{self.task}  mode={self.mode}  k={self.k}  lm={self.lm.get('model')}"
               + (f" @ {self.lm['api_base']}" if self.lm.get("api_base") else "")
               + f"  primary={self.primary_metric} ({direction} is better)"]
        if self.note:
            out.append(f"NOTE: {self.note}")
        out.append(table)
        for failure in self.failures:
            out.append(f"FAILED {failure.user_id} at {failure.stage}: {failure.error_type}: {failure.error}")
        if self.skipped_users:
            why = "interrupted" if self.interrupted else f"after {plural(len(self.failures), 'failure')}"
            out.append(f"SKIPPED {plural(len(self.skipped_users), 'user')} ({why})")
        invalid = f" ({self.n_invalid} of them invalid answers, scored as LaMP scores them)" if self.n_invalid else ""
        out.append(f"{self.n_scored}/{self.n_queries} queries of {plural(self.n_users, 'user')} scored{invalid}; "
                   f"{self.calls} LM calls, "
                   f"{self.tokens.get('total_tokens', 0)} tokens ({self.tokens.get('prompt_tokens', 0)} prompt, "
                   f"{self.tokens.get('completion_tokens', 0)} completion"
                   + (f", {self.tokens['unmetered_calls']} calls unmetered" if self.tokens.get("unmetered_calls")
                      else "")
                   + f"); {self.wall_seconds:.2f} s with {self.workers} workers")
        if self.output_totals:
            out.append(counts_line(self.output_totals))
            warning = invalid_warning(self.output_totals)
            if warning:
                out.append(f"WARNING: {warning}")
        if self.agents:
            compiled = sum(source != "initial" for source in self.agents.values())
            out.append(f"answered by: {plural(compiled, 'compiled program')}, "
                       f"{plural(len(self.agents) - compiled, 'initial persona')}")
        if self.vs_initial is not None:
            out.append(self.side_by_side())
        return "\n".join(out)

    def side_by_side(self) -> str:
        """Initial persona against compiled program for the same users, on the primary metric (``--vs-initial``)."""
        key, initial = self.primary_metric, self.vs_initial or {}
        rows = []
        for user, metrics in self.per_user.items():
            before = initial.get("per_user", {}).get(user, {}).get(key)
            after = metrics.get(key)
            rows.append({"user": user, "program": "compiled" if self.agents.get(user, "initial") != "initial"
                         else "initial", f"initial {key}": before, f"this run {key}": after,
                         "change": None if before is None or after is None else after - before})
        before, after = initial.get("overall", {}).get(key), self.overall.get(key)
        footer = [{"user": "ALL (pooled)", "program": "", f"initial {key}": before, f"this run {key}": after,
                   "change": None if before is None or after is None else after - before}]
        direction = "higher" if self.higher_is_better else "lower"
        return (f"initial persona vs this run, same users ({key}, {direction} is better):\n"
                + format_table(rows, ["user", "program", f"initial {key}", f"this run {key}", "change"], digits=4,
                               missing="-", align_numbers_right=True, rule=True, footer=footer))


def versions() -> dict[str, str]:
    """Versions that can change a score, for the report."""
    found = {"python": platform.python_version()}
    for dist in ("persona-dspy", "dspy", "litellm", "qdrant-client", "fastembed"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def default_agent_factory(memory: EpisodicMemory | None, mode: AgentMode, k: int) -> AgentFactory:
    """The paper's setup: a persona summarised from the user's history (not in mode "none", the baseline)."""

    def make(history: UserHistory) -> PersonaAgent:
        return initial_agent(history, memory, mode=mode, k=k)

    return make


@dataclass
class _UserOutcome:
    records: list[PredictionRecord] = field(default_factory=list)
    failure: UserFailure | None = None
    outputs: dict[str, Any] = field(default_factory=dict)


def _answer_one(agent: Any, example: dspy.Example) -> dspy.Prediction:
    """The agent's answer; a prompt that cannot fit the context is that query's invalid answer, not the user's end."""
    try:
        return agent(**example.inputs())
    except Exception as exc:
        sizes = exc.describe() if isinstance(exc, PromptTooLong) else overflow_sizes(exc)
        if sizes is None:
            raise
        logger.warning("query %s: %s", example.example_id, sizes)
        record_output("answer", checked=1, invalid=sizes)
        return dspy.Prediction(answer="", raw_answer="", passages=[], invalid=sizes)


def _run_user(history: UserHistory, task: str, factory: AgentFactory, lm: dspy.LM, usage: LMUsage) -> _UserOutcome:
    """One user, start to end, in a worker thread; an exception becomes a recorded failure."""
    stage = "persona"
    stats = OutputStats()
    try:
        examples = query_examples(history)
        with dspy.context(lm=lm, adapter=default_adapter()), counting(usage, stats):
            agent = factory(history)
            records = []
            for example in examples:
                stage = f"query {example.example_id}"
                prediction = _answer_one(agent, example)
                answer = "" if prediction.answer is None else str(prediction.answer)
                raw = getattr(prediction, "raw_answer", None)
                passages = getattr(prediction, "passages", None) or []
                invalid = getattr(prediction, "invalid", None)
                records.append(PredictionRecord(
                    user_id=history.user_id, query_id=str(example.example_id), prediction=answer,
                    raw_answer=answer if raw is None else str(raw), gold=str(example.answer),
                    score=per_example_score(task, answer, example.answer),
                    passage_ids=tuple(str(getattr(p, "item_id", "")) for p in passages),
                    invalid=None if invalid is None else str(invalid),
                    context_fit=getattr(prediction, "context_fit", None)))
        return _UserOutcome(records, outputs=stats.snapshot())
    except Exception as exc:  # one user's failure must not stop the others: record it, scored nowhere
        logger.warning("user %s failed at %s: %s: %s", history.user_id, stage, type(exc).__name__, exc)
        logger.debug("user %s traceback", history.user_id, exc_info=True)
        sizes = overflow_sizes(exc)  # the sizes are in the server's reply, not in the message litellm makes
        error = redact_text((str(exc) or repr(exc)) + (f" ({sizes.partition(':')[0]})" if sizes else ""))
        failure = UserFailure(history.user_id, type(exc).__name__, error, stage, len(history.queries))
        return _UserOutcome(failure=failure, outputs=stats.snapshot())


def evaluate(
    histories: Sequence[UserHistory],
    *,
    memory: EpisodicMemory | None,
    mode: AgentMode = DEFAULT_MODE,
    lm: dspy.LM,
    workers: int = 4,
    k: int = 5,
    agent_factory: AgentFactory | None = None,
    progress: bool | None = None,
    max_failures: int | None = None,
    interrupt: threading.Event | None = None,
) -> EvalReport:
    """Answer every user's test queries with their own agent and score them as LaMP does.

    ``memory`` must already hold the histories (``memory.add_histories``); it may be None in mode "none".
    ``max_failures``: after that many failed users, users not yet started are skipped (a dead server should not
    be retried user after user); None never stops. Results come back in the order of ``histories`` whatever the
    number of workers. ``interrupt`` (set by Ctrl-C): start no new user, give those in flight a few seconds, then
    report what completed (``interrupted`` set, the rest among ``skipped_users``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if max_failures is not None and max_failures < 1:
        raise ValueError(f"max_failures must be at least 1 (or None), got {max_failures}")
    task = common_task(histories, "evaluation")
    if agent_factory is None and mode != "none" and memory is None:
        raise ValueError(f"mode {mode!r} needs a memory holding the users' histories")
    ids = [h.user_id for h in histories]
    if len(set(ids)) != len(ids):
        raise ValueError("user ids must be unique within an evaluation")
    factory = agent_factory or default_agent_factory(memory, mode, k)

    usage = LMUsage()
    outcomes: dict[str, _UserOutcome] = {}
    stop = threading.Event()
    n_queries = sum(len(h.queries) for h in histories)
    failed = 0
    lock = threading.Lock()

    def run(history: UserHistory) -> _UserOutcome:
        nonlocal failed
        status.start_user(history.user_id, answer=len(history.queries))
        try:
            outcome = _run_user(history, task, factory, lm, usage)
        finally:
            status.finish_user()
        if outcome.failure is not None:
            with lock:  # counted here, not in the main thread, so a worker never starts a user after the limit
                failed += 1
                if max_failures is not None and failed >= max_failures and not stop.is_set():
                    logger.warning("stopping after %s; users not started yet are skipped",
                                   plural(failed, "failed user"))
                    stop.set()
        return outcome

    started = time.perf_counter()
    most = max((len(h.queries) for h in histories), default=0)
    with progress_bar(len(histories), f"{task} {mode}", progress) as bar, \
            RunProgress(bar, users=len(histories), workers=workers, per_pass={}, calls_bound=most + 1) as status, \
            counting(status):
        def done(history: UserHistory, outcome: _UserOutcome) -> None:
            outcomes[history.user_id] = outcome
            status.note = f"{plural(failed, 'user')} failed" if failed else ""
            bar.update(1)

        ran = run_users(histories, run, done, workers=workers, stop=stop, interrupt=interrupt,
                        name="persona-eval")
    wall = time.perf_counter() - started
    skipped = [h.user_id for h in histories if h.user_id not in outcomes]

    records = [r for h in histories if h.user_id in outcomes for r in outcomes[h.user_id].records]
    failures = [failure for h in histories if h.user_id in outcomes
                and (failure := outcomes[h.user_id].failure) is not None]
    if records:
        scores = aggregate_by_user(task, ((r.user_id, r.prediction, r.gold) for r in records))
        overall, per_user = scores["overall"], scores["per_user"]
    else:
        overall, per_user = {}, {}
    snap = usage.snapshot()
    outputs = {h.user_id: outcomes[h.user_id].outputs for h in histories if h.user_id in outcomes}
    totals = OutputStats()
    for counts in outputs.values():
        totals.merge(counts)
    offline = is_offline(lm)
    key, higher = primary_metric(task)
    return EvalReport(
        task=task, mode=mode, k=k, overall=overall, per_user=per_user, predictions=records,
        failures=failures, skipped_users=skipped, lm=describe_lm(lm), offline=offline,
        note=OFFLINE_NOTE if offline else None, calls=snap["calls"],
        tokens={name: snap[name] for name in ("prompt_tokens", "completion_tokens", "total_tokens",
                                              "unmetered_calls", "errors")},
        wall_seconds=round(wall, 3), workers=workers, n_users=len(histories), n_queries=n_queries,
        primary_metric=key, higher_is_better=higher, versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"), interrupted=ran.interrupted,
        outputs=outputs, output_totals=totals.snapshot(),
    )
