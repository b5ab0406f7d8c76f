"""Comparing prompt optimizers on the same users: PersonaAligner against DSPy's own (GEPA, MIPROv2, COPRO, ...).

Every optimizer sees exactly the same thing per user, so differences come from the optimizer alone:

* the same users, and per user the same trainset: the ``n_recent`` latest interactions before the user's earliest
  query (``interaction_examples``), asked again in the task's format;
* the same validation slice, which is the trainset itself (see ``VALIDATION_NOTE`` for why);
* the same starting program: PersonaAgent (rag) with the user's initial persona, summarised once per user from the
  shared history (one LM call, recorded apart from every optimizer's calls) and deep-copied for each optimizer;
* the same task metric (``metrics.dspy_metric``), task LM and optimizer LM, and fixed seeds.

Per user and optimizer the program is compiled on the trainset, then scored on the user's held-out test queries
(``query_examples``) and on the validation slice; LaMP's metrics pool the examples of all users that completed, as
``metrics.aggregate_by_user`` does. LM calls and tokens are counted with an ``LMUsage`` callback, separately for the
compile step and the evaluation step. A user on whom an optimizer raises is recorded as that optimizer's failure
(stage, error) and the run goes on; an unknown optimizer name is recorded the same way.

What each DSPy optimizer runs with, and why (3-example trainsets are far below what they were designed for):

* ``gepa``: ``dspy.GEPA`` with ``TextualLossMetric`` (the persona aligner's loss) as the feedback metric and the
  optimizer LM as reflection LM. ``auto="light"`` budgets about 390 metric calls for one predictor and a 3-example
  valset (its minibatch size is fixed at 35 inside ``auto_budget``): some 600 LM calls per user, 25x the aligner.
  It runs with ``max_metric_calls=30`` instead: the seed evaluation (3) plus three reflective steps (3 + 3 rollouts,
  and 3 more when a proposal is accepted), the scale of the aligner's 3 iterations. GEPA scores every rollout with
  the metric (``pred_name=None``) and asks for feedback only for reflection; ``TextualLossMetric`` skips the feedback
  LM call when only a score is wanted, which halves GEPA's LM calls without changing what it sees.
* ``miprov2``: instructions only (``max_bootstrapped_demos=0, max_labeled_demos=0``), ``auto="light"``, and the
  valset passed explicitly: without it MIPROv2 keeps 80 % of the trainset for validation, i.e. proposes from one
  example. ``light`` turns minibatching off for valsets of at most 50 examples, so its ``minibatch_size=35`` never
  exceeds the 3-example valset (it would raise otherwise). 6 instruction candidates, 9 trials on the full valset.
* ``copro``: breadth 3, depth 2 (its defaults, 10 and 3, evaluate 30 candidates). COPRO has no valset argument; it
  scores candidates on the trainset, which is the validation slice anyway. It has no seed either. It gets its
  candidates as ``n`` completions of one request: a server that ignores ``n`` (the loopback test server does) leaves
  it fewer candidates, which the per-user details record (``candidates_evaluated`` against ``candidates_planned``).
  LM calls count requests, so an ``n=3`` request is one call.
* ``bootstrap_fewshot``: ``BootstrapFewShot`` with ``metric_threshold=1.0``: without a threshold it keeps a trace
  whenever the float score is truthy (any LaMP_3 rating within 3 stars), so only exact answers become bootstrapped
  demos; the other interactions fill in as labeled demos (its defaults allow 4 + 16, so all 3 are used).
* ``persona_aligner``: ``PersonaAligner`` defaults (3 iterations on the 3 interactions, at most 24 LM calls per
  user).

Scores measured with the offline stand-in LM are plumbing checks, never a model's score; reports say so.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import dspy
from tqdm import tqdm

from optimizers.lm_usage import LMUsage
from optimizers.persona_aligner import PersonaAligner
from optimizers.textual_loss import Metric, TextualLossMetric
from persona_dspy.alignment import DEFAULT_RECENT, initial_agent
from persona_dspy.evaluation import OFFLINE_NOTE, versions
from persona_dspy.examples import interaction_examples, query_examples
from persona_dspy.lm import describe_lm
from persona_dspy.memory import EpisodicMemory
from persona_dspy.metrics import aggregate_by_user, dspy_metric, metric_keys, per_example_score, primary_metric
from persona_dspy.offline_lm import is_offline
from persona_dspy.programs import write_atomically
from persona_dspy.records import UserHistory, common_task
from persona_dspy.semantic_memory import initial_persona
from persona_dspy.tables import format_table

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "initial", "non_personalized", "persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot",
)

GEPA_MAX_METRIC_CALLS = 30
COPRO_BREADTH = 3
COPRO_DEPTH = 2
BOOTSTRAP_METRIC_THRESHOLD = 1.0

VALIDATION_NOTE = (
    "validation slice = the trainset (the user's n_recent latest interactions). With 3 interactions there is no "
    "room for a disjoint slice: any split leaves 1-2 examples to train or to select on. Older interactions as a "
    "separate slice would select on staler preferences than the test queries follow, and PersonaAligner, GEPA and "
    "COPRO use the trainset for selection by default anyway. So val scores are in-sample (demo optimizers even "
    "show the val answers in the prompt); the held-out test queries are the comparison."
)
FAILED_PREDICTION_NOTE = (
    "a test or validation query whose program raised is scored as an empty answer (LaMP's penalty for an "
    "unusable prediction) and counted in prediction_errors; a user whose every test query raised is a failure"
)

Start = Literal["initial", "none"]


# --------------------------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class CompileInputs:
    """What an optimizer gets for one user: a private copy of the starting program, the data and the LMs."""

    history: UserHistory
    student: dspy.Module
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    metric: Metric
    lm: dspy.LM
    optimizer_lm: dspy.LM
    seed: int


CompileFn = Callable[[CompileInputs], dspy.Module]


@dataclass(frozen=True)
class OptimizerSpec:
    """One contender: how it compiles a user's program, what it starts from, and its settings (for the report).

    ``start="initial"`` starts from the shared initial-persona agent (rag); ``"none"`` from the non-personalized
    agent. ``compile`` runs under the task LM with usage counting; it must not rely on ``dspy.configure``.
    """

    name: str
    compile: CompileFn
    start: Start = "initial"
    settings: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def record(self) -> dict[str, Any]:
        return {"start": self.start, "description": self.description, **dict(self.settings)}


def _unchanged(inputs: CompileInputs) -> dspy.Module:
    return inputs.student


def persona_aligner_spec() -> OptimizerSpec:
    """PersonaAligner with its defaults: the paper's test-time alignment."""
    defaults = PersonaAligner(lambda example, prediction: 0.0).settings()  # the defaults, for the report

    def run(inputs: CompileInputs) -> dspy.Module:
        optimizer = PersonaAligner(inputs.metric, optimizer_lm=inputs.optimizer_lm, rng=random.Random(inputs.seed))
        return optimizer.compile(inputs.student, trainset=inputs.trainset, valset=inputs.valset)

    return OptimizerSpec("persona_aligner", run, settings=defaults,
                         description="loss -> feedback -> persona update, best persona on the validation slice")


def gepa_spec(max_metric_calls: int = GEPA_MAX_METRIC_CALLS, auto: Literal["light", "medium", "heavy"] | None = None,
              name: str = "gepa") -> OptimizerSpec:
    """dspy.GEPA on the persona predictor, with the textual loss as feedback (budget: see the module docstring).

    ``auto`` uses GEPA's own budget presets instead of ``max_metric_calls`` (the benchmark measures "light").
    """
    budget: dict[str, Any] = {"auto": auto} if auto else {"max_metric_calls": max_metric_calls}
    settings = {"optimizer": "dspy.GEPA", "metric": "TextualLossMetric (feedback only when GEPA reads it)",
                "reflection_lm": "optimizer LM", **budget,
                "reflection_minibatch_size": "min(3, len(trainset))", "candidate_selection_strategy": "pareto",
                "use_merge": True, "why_budget": "auto='light' is ~390 metric calls (~600 LM calls) per user with "
                "a 3-example valset; 30 = seed eval + ~3 reflective steps, the aligner's scale"}

    def run(inputs: CompileInputs) -> dspy.Module:
        feedback = TextualLossMetric(inputs.metric, lm=inputs.optimizer_lm)
        optimizer = dspy.GEPA(metric=feedback, **budget,
                              reflection_minibatch_size=min(3, len(inputs.trainset)),
                              reflection_lm=inputs.optimizer_lm, seed=inputs.seed, track_stats=True)
        program = optimizer.compile(inputs.student, trainset=inputs.trainset, valset=inputs.valset)
        result = getattr(program, "detailed_results", None)
        if result is not None:
            program.comparison_details = {
                "candidates": len(result.candidates), "best_idx": result.best_idx,
                "val_aggregate_scores": [round(s, 4) for s in result.val_aggregate_scores],
                "total_metric_calls": result.total_metric_calls, "num_full_val_evals": result.num_full_val_evals}
            del program.detailed_results  # holds every candidate program: too much to carry around
        return program

    return OptimizerSpec(name, run, settings=settings,
                         description="reflective instruction evolution with Pareto selection")


def miprov2_spec(auto: Literal["light", "medium", "heavy"] = "light") -> OptimizerSpec:
    """MIPROv2, instructions only (zero demos), with the validation slice passed explicitly."""
    settings = {"optimizer": "dspy.MIPROv2", "auto": auto, "max_bootstrapped_demos": 0, "max_labeled_demos": 0,
                "prompt_model": "optimizer LM", "task_model": "task LM", "valset": "passed (else 80% of 3 -> 2)",
                "minibatch": "off (auto turns it off for valsets <= 50)"}

    def run(inputs: CompileInputs) -> dspy.Module:
        optimizer = dspy.MIPROv2(inputs.metric, prompt_model=inputs.optimizer_lm, task_model=inputs.lm,
                                 max_bootstrapped_demos=0, max_labeled_demos=0, auto=auto, seed=inputs.seed,
                                 verbose=False, track_stats=True)
        program = optimizer.compile(inputs.student, trainset=inputs.trainset, valset=inputs.valset)
        program.comparison_details = {"trials": len(getattr(program, "trial_logs", {}) or {}),
                                      "best_val_score": getattr(program, "score", None),
                                      "instruction_candidates": len(getattr(program, "candidate_programs", []) or [])}
        return program

    return OptimizerSpec("miprov2", run, settings=settings,
                         description="Bayesian search over proposed instructions (no demos)")


def copro_spec(breadth: int = COPRO_BREADTH, depth: int = COPRO_DEPTH) -> OptimizerSpec:
    """COPRO with a small breadth and depth; it scores candidates on the trainset (= the validation slice)."""
    settings = {"optimizer": "dspy.COPRO", "breadth": breadth, "depth": depth, "init_temperature": 1.4,
                "prompt_model": "optimizer LM", "scored_on": "trainset (COPRO takes no valset)", "seed": "none"}

    def run(inputs: CompileInputs) -> dspy.Module:
        optimizer = dspy.COPRO(prompt_model=inputs.optimizer_lm, metric=inputs.metric, breadth=breadth, depth=depth)
        program = optimizer.compile(inputs.student, trainset=inputs.trainset,
                                    eval_kwargs={"display_progress": False, "display_table": 0})
        evaluated, planned = getattr(program, "total_calls", None), breadth * depth
        program.comparison_details = {"candidates_evaluated": evaluated, "candidates_planned": planned}
        if evaluated is not None and evaluated < planned:
            program.comparison_details["short"] = ("fewer candidates than planned: COPRO asks for n completions per "
                                                   "request and this server returned fewer (many ignore n)")
            logger.warning("COPRO evaluated %d of %d candidates: the LM server returned fewer than n completions",
                           evaluated, planned)
        return program

    return OptimizerSpec("copro", run, settings=settings,
                         description="coordinate ascent over generated instructions and output prefixes")


def bootstrap_fewshot_spec(metric_threshold: float = BOOTSTRAP_METRIC_THRESHOLD) -> OptimizerSpec:
    """BootstrapFewShot: the user's interactions as demos, bootstrapped traces only for exact answers."""
    settings = {"optimizer": "dspy.BootstrapFewShot", "metric_threshold": metric_threshold,
                "max_bootstrapped_demos": 4, "max_labeled_demos": 16, "max_rounds": 1,
                "why_threshold": "without it any truthy float (a rating within 3 stars) passes"}

    def run(inputs: CompileInputs) -> dspy.Module:
        optimizer = dspy.BootstrapFewShot(metric=inputs.metric, metric_threshold=metric_threshold)
        return optimizer.compile(inputs.student, trainset=inputs.trainset)

    return OptimizerSpec("bootstrap_fewshot", run, settings=settings,
                         description="few-shot demos from the user's own interactions")


def default_specs() -> dict[str, OptimizerSpec]:
    """The contenders by name (fresh specs, so callers may replace one without touching the others)."""
    specs = [
        OptimizerSpec("initial", _unchanged, settings={"optimizer": "none"},
                      description="no optimization: PersonaAgent (rag) with the initial persona"),
        OptimizerSpec("non_personalized", _unchanged, start="none", settings={"optimizer": "none"},
                      description="PersonaAgent mode 'none': no memory, no persona"),
        persona_aligner_spec(), gepa_spec(), miprov2_spec(), copro_spec(), bootstrap_fewshot_spec(),
    ]
    return {spec.name: spec for spec in specs}


# --------------------------------------------------------------------------------------------- the report


@dataclass
class UserRun:
    """One optimizer on one user: the data it got, its scores, its cost, or where and why it failed."""

    optimizer: str
    user_id: str
    status: str  # ok | failed
    trainset_ids: list[str]
    valset_ids: list[str]
    test_ids: list[str]
    stage: str | None = None  # initial_persona | compile | test | validation, for failures
    error_type: str | None = None
    error: str | None = None
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test_predictions: list[dict[str, Any]] = field(default_factory=list)
    val_predictions: list[dict[str, Any]] = field(default_factory=list)
    prediction_errors: int = 0
    compile_usage: dict[str, Any] = field(default_factory=dict)
    eval_usage: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0
    instructions: str | None = None
    n_demos: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def compile_calls(self) -> int:
        return int(self.compile_usage.get("calls", 0))

    @property
    def eval_calls(self) -> int:
        return int(self.eval_usage.get("calls", 0))


@dataclass
class OptimizerResult:
    """One optimizer over all users: pooled scores (users that completed), summed costs, failures."""

    name: str
    settings: dict[str, Any]
    status: str  # ok | partial | failed
    error: str | None
    n_users: int
    n_users_scored: int
    test: dict[str, float]
    val: dict[str, float]
    compile_calls: int
    eval_calls: int
    compile_tokens: int
    eval_tokens: int
    compile_seconds: float
    eval_seconds: float
    prediction_errors: int
    failures: list[dict[str, Any]]
    users: list[UserRun]

    @property
    def wall_seconds(self) -> float:
        return round(self.compile_seconds + self.eval_seconds, 3)

    def _per_scored_user(self, value: float) -> float | None:
        return value / self.n_users_scored if self.n_users_scored else None

    @property
    def compile_calls_per_user(self) -> float | None:
        """Mean compile LM calls over the users that completed (the initial persona call not included)."""
        return self._per_scored_user(sum(u.compile_calls for u in self.users if u.status == "ok"))

    @property
    def eval_calls_per_user(self) -> float | None:
        return self._per_scored_user(sum(u.eval_calls for u in self.users if u.status == "ok"))


@dataclass
class ComparisonReport:
    """All optimizers on the same users; ``table()`` prints it, ``to_json``/``to_csv`` keep it."""

    task: str
    primary_metric: str
    higher_is_better: bool
    metric_keys: list[str]
    lm: dict[str, Any]
    optimizer_lm: dict[str, Any] | None
    offline: bool
    note: str | None
    n_recent: int
    k: int
    seed: int
    user_ids: list[str]
    users: dict[str, dict[str, Any]]
    persona_usage: dict[str, Any]
    results: list[OptimizerResult]
    wall_seconds: float
    notes: list[str]
    versions: dict[str, str]
    created: str

    def result(self, name: str) -> OptimizerResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no optimizer {name!r} in this report; it has {', '.join(r.name for r in self.results)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for result, out in zip(self.results, data["results"], strict=True):
            out["wall_seconds"] = result.wall_seconds
            out["compile_calls_per_user"] = result.compile_calls_per_user
            out["eval_calls_per_user"] = result.eval_calls_per_user
        return data

    def to_json(self, path: str | Path) -> Path:
        """Everything, as indented JSON, atomically (parent folders are created); returns the path."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_json_value) + "\n"
        return write_atomically(Path(path).expanduser(), text.encode("utf-8"))

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per optimizer (what ``to_csv`` writes)."""
        rows = []
        for r in self.results:
            row: dict[str, Any] = {"optimizer": r.name, "status": r.status, "users": r.n_users,
                                   "users_scored": r.n_users_scored,
                                   "primary_metric": self.primary_metric,
                                   "test_primary": r.test.get(self.primary_metric),
                                   "val_primary": r.val.get(self.primary_metric)}
            row.update({f"test_{key}": r.test.get(key) for key in self.metric_keys})
            row.update({f"val_{key}": r.val.get(key) for key in self.metric_keys})
            row.update({"compile_calls": r.compile_calls, "eval_calls": r.eval_calls,
                        "compile_calls_per_user": r.compile_calls_per_user,
                        "eval_calls_per_user": r.eval_calls_per_user,
                        "initial_persona_calls_per_user": self.persona_calls_per_user(r),
                        "compile_tokens": r.compile_tokens, "eval_tokens": r.eval_tokens,
                        "compile_seconds": r.compile_seconds, "eval_seconds": r.eval_seconds,
                        "wall_seconds": r.wall_seconds, "prediction_errors": r.prediction_errors,
                        "failures": len(r.failures),
                        "failure_reasons": r.error or "; ".join(f"{f['user_id']}@{f['stage']}: {f['error_type']}"
                                                                f": {f['error']}" for f in r.failures),
                        "lm": self.lm.get("model"), "offline": self.offline, "note": self.note or ""})
            rows.append(row)
        return rows

    def user_rows(self) -> list[dict[str, Any]]:
        """One flat row per optimizer and user (what ``to_user_csv`` writes)."""
        rows = []
        for r in self.results:
            for u in r.users:
                row: dict[str, Any] = {"optimizer": r.name, "user_id": u.user_id, "status": u.status,
                                       "stage": u.stage or "", "error": f"{u.error_type}: {u.error}" if u.error else ""}
                row.update({f"test_{key}": u.test.get(key) for key in self.metric_keys})
                row.update({f"val_{key}": u.val.get(key) for key in self.metric_keys})
                row.update({"compile_calls": u.compile_calls, "eval_calls": u.eval_calls,
                            "compile_tokens": u.compile_usage.get("total_tokens", 0),
                            "eval_tokens": u.eval_usage.get("total_tokens", 0),
                            "compile_seconds": u.compile_seconds, "eval_seconds": u.eval_seconds,
                            "prediction_errors": u.prediction_errors, "n_demos": u.n_demos,
                            "trainset_ids": " ".join(u.trainset_ids), "valset_ids": " ".join(u.valset_ids),
                            "offline": self.offline})
                rows.append(row)
        return rows

    def to_csv(self, path: str | Path) -> Path:
        """One row per optimizer; returns the path."""
        return _write_csv(path, self.rows())

    def to_user_csv(self, path: str | Path) -> Path:
        """One row per optimizer and user; returns the path."""
        return _write_csv(path, self.user_rows())

    def save(self, folder: str | Path, stem: str = "comparison") -> dict[str, Path]:
        """``<stem>.json``, ``<stem>.csv`` and ``<stem>_users.csv`` in ``folder``."""
        base = Path(folder).expanduser()
        return {"json": self.to_json(base / f"{stem}.json"), "csv": self.to_csv(base / f"{stem}.csv"),
                "users_csv": self.to_user_csv(base / f"{stem}_users.csv")}

    def persona_calls_per_user(self, result: OptimizerResult) -> float:
        """The initial persona's calls per user, for an optimizer that starts from it (0 for the others)."""
        if result.settings.get("start") != "initial" or not self.users:
            return 0.0
        return self.persona_usage.get("calls", 0) / len(self.users)

    def table(self) -> str:
        """A printable table: one row per optimizer, then the shared costs and any failures."""
        direction = "higher" if self.higher_is_better else "lower"
        header = ["optimizer", "users", *(f"test {k}" for k in self.metric_keys),
                  *(f"val {k}" for k in self.metric_keys), "compile/user", "eval/user", "tokens", "seconds", "status"]
        rows = [{"optimizer": r.name, "users": f"{r.n_users_scored}/{r.n_users}",
                 **{f"test {k}": r.test.get(k) for k in self.metric_keys},
                 **{f"val {k}": r.val.get(k) for k in self.metric_keys},
                 "compile/user": r.compile_calls_per_user, "eval/user": r.eval_calls_per_user,
                 "tokens": r.compile_tokens + r.eval_tokens, "seconds": r.wall_seconds, "status": r.status}
                for r in self.results]
        table = format_table(rows, header, digits=4, formats={"compile/user": ".1f", "eval/user": ".1f",
                                                              "seconds": ".2f"},
                             missing="-", align_numbers_right=True, rule=True)

        lm_text = f"{self.lm.get('model')}" + (f" @ {self.lm['api_base']}" if self.lm.get("api_base") else "")
        if self.optimizer_lm:
            lm_text += f"  optimizer_lm={self.optimizer_lm.get('model')}"
        out = [f"{self.task}: {len(self.user_ids)} users, trainset = {self.n_recent} latest interactions, "
               f"validation slice = trainset; lm={lm_text}; primary={self.primary_metric} ({direction} is better)"]
        if self.note:
            out.append(f"NOTE: {self.note}")
        out.append(table)
        out.append(f"LM calls per user: compile and eval (test + validation) counted apart; the initial persona "
                   f"({self.persona_usage.get('calls', 0)} calls in all) is shared by every optimizer starting from "
                   "it and counted in neither. Scores pool the users that completed.")
        for r in self.results:
            if r.error:
                out.append(f"FAILED {r.name}: {r.error}")
            for failure in r.failures:
                out.append(f"FAILED {r.name} on {failure['user_id']} at {failure['stage']}: "
                           f"{failure['error_type']}: {failure['error']}")
        return "\n".join(out)


def _json_value(value: Any) -> Any:
    """Numbers an optimizer reports as numpy scalars stay numbers; anything else becomes its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV, written atomically like the JSON report (parent folders are created)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["optimizer"])
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return write_atomically(Path(path).expanduser(), buffer.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------------------------- running


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Keep DSPy optimizers' progress bars, prints (COPRO prints whole prompts) and INFO logs out of the output.

    What they write is logged at DEBUG instead; this process's own log handlers keep their streams. Redirecting
    sys.stdout/sys.stderr is process-wide: run one comparison at a time per process.
    """
    if not enabled:
        yield
        return
    buffer = io.StringIO()
    dspy_logger = logging.getLogger("dspy")
    level = dspy_logger.level
    dspy_logger.setLevel(logging.WARNING)
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            yield
    finally:
        dspy_logger.setLevel(level)
        if buffer.tell():
            logger.debug("optimizer output:\n%s", buffer.getvalue()[-20000:])


@contextmanager
def _counted(lm: dspy.LM, usage: LMUsage) -> Iterator[None]:
    with dspy.context(lm=lm, callbacks=[*(dspy.settings.get("callbacks") or []), usage]):
        yield


def _ids(examples: Sequence[dspy.Example]) -> list[str]:
    return [str(ex.get("example_id", i)) for i, ex in enumerate(examples)]


def _answer(program: dspy.Module, examples: Sequence[dspy.Example], task: str,
            user_id: str) -> tuple[list[dict[str, Any]], int]:
    """Every example answered; a raising program scores as an empty answer (see FAILED_PREDICTION_NOTE)."""
    rows, errors = [], 0
    for example in examples:
        error = None
        try:
            prediction = program(**example.inputs())
            answer = "" if prediction.answer is None else str(prediction.answer)
        except Exception as exc:  # one bad answer costs its score, not the user's whole run
            errors += 1
            answer, error = "", f"{type(exc).__name__}: {exc}"
            logger.warning("%s: %s failed on %s: %s", task, user_id, example.get("example_id"), error)
        rows.append({"example_id": str(example.get("example_id")), "prediction": answer,
                     "gold": str(example.answer), "score": per_example_score(task, answer, example.answer),
                     "error": error})
    return rows, errors


def _program_text(program: dspy.Module) -> tuple[str | None, int]:
    predictors = program.predictors()
    if not predictors:
        return None, 0
    return predictors[-1].signature.instructions, sum(len(getattr(p, "demos", []) or []) for p in predictors)


def _copies(examples: Sequence[dspy.Example]) -> list[dspy.Example]:
    return [ex.copy() for ex in examples]


def _run_one(spec: OptimizerSpec, history: UserHistory, base: dspy.Module, trainset: list[dspy.Example],
             tests: list[dspy.Example], task: str, metric: Metric, lm: dspy.LM, optimizer_lm: dspy.LM, seed: int,
             quiet: bool) -> UserRun:
    """Compile one copy of the starting program, then score it; an exception becomes a recorded failure."""
    train = _copies(trainset)
    val = list(train)  # the same objects: optimizers that cache answers per example share them (as the aligner)
    run = UserRun(spec.name, history.user_id, "ok", _ids(train), _ids(val), _ids(tests))
    compile_usage, eval_usage = LMUsage(), LMUsage()
    stage = "compile"
    started = time.perf_counter()
    try:
        inputs = CompileInputs(history, base.deepcopy(), train, val, metric, lm, optimizer_lm, seed)
        with _quiet(quiet), _counted(lm, compile_usage):
            program = spec.compile(inputs)
        run.compile_seconds = round(time.perf_counter() - started, 3)
        run.instructions, run.n_demos = _program_text(program)
        alignment = getattr(program, "alignment", None)
        if isinstance(alignment, dict):
            run.details = {"alignment": {k: v for k, v in alignment.items() if k != "lm_usage"}}
        if isinstance(getattr(program, "comparison_details", None), dict):
            run.details = dict(program.comparison_details)
        started = time.perf_counter()
        with _quiet(quiet), _counted(lm, eval_usage):
            stage = "test"
            run.test_predictions, test_errors = _answer(program, tests, task, history.user_id)
            if tests and test_errors == len(tests):
                raise RuntimeError(f"every test query failed; first: {run.test_predictions[0]['error']}")
            stage = "validation"
            run.val_predictions, val_errors = _answer(program, val, task, history.user_id)
        run.eval_seconds = round(time.perf_counter() - started, 3)
        run.prediction_errors = test_errors + val_errors
        run.test = _scores(task, history.user_id, run.test_predictions)
        run.val = _scores(task, history.user_id, run.val_predictions)
    except Exception as exc:  # one optimizer failing on one user must not stop the comparison
        elapsed = round(time.perf_counter() - started, 3)
        if stage == "compile":
            run.compile_seconds = elapsed
        else:
            run.eval_seconds = elapsed
        run.status, run.stage, run.error_type, run.error = "failed", stage, type(exc).__name__, str(exc) or repr(exc)
        logger.warning("%s failed on %s at %s: %s: %s", spec.name, history.user_id, stage, run.error_type, run.error)
        logger.debug("%s on %s traceback", spec.name, history.user_id, exc_info=True)
    run.compile_usage, run.eval_usage = compile_usage.snapshot(), eval_usage.snapshot()
    return run


def _scores(task: str, user_id: str, predictions: list[dict[str, Any]]) -> dict[str, float]:
    if not predictions:
        return {}
    return aggregate_by_user(task, ((user_id, p["prediction"], p["gold"]) for p in predictions))["overall"]


def _pooled(task: str, runs: Sequence[UserRun], split: Literal["test", "val"]) -> dict[str, float]:
    rows = [(u.user_id, p["prediction"], p["gold"]) for u in runs if u.status == "ok"
            for p in (u.test_predictions if split == "test" else u.val_predictions)]
    return aggregate_by_user(task, rows)["overall"] if rows else {}


def _summarize(spec_name: str, settings: dict[str, Any], error: str | None, task: str, n_users: int,
               runs: list[UserRun]) -> OptimizerResult:
    ok = [u for u in runs if u.status == "ok"]
    failures = [{"user_id": u.user_id, "stage": u.stage, "error_type": u.error_type, "error": u.error}
                for u in runs if u.status != "ok"]
    status = "failed" if error or not ok else ("ok" if len(ok) == n_users else "partial")
    return OptimizerResult(
        name=spec_name, settings=settings, status=status, error=error, n_users=n_users, n_users_scored=len(ok),
        test=_pooled(task, runs, "test"), val=_pooled(task, runs, "val"),
        compile_calls=sum(u.compile_calls for u in runs), eval_calls=sum(u.eval_calls for u in runs),
        compile_tokens=sum(int(u.compile_usage.get("total_tokens", 0)) for u in runs),
        eval_tokens=sum(int(u.eval_usage.get("total_tokens", 0)) for u in runs),
        compile_seconds=round(sum(u.compile_seconds for u in runs), 3),
        eval_seconds=round(sum(u.eval_seconds for u in runs), 3),
        prediction_errors=sum(u.prediction_errors for u in runs), failures=failures, users=runs,
    )


def _resolve(optimizers: Sequence[str | OptimizerSpec]) -> list[tuple[str, OptimizerSpec | None, str | None]]:
    known = default_specs()
    resolved: list[tuple[str, OptimizerSpec | None, str | None]] = []
    for item in optimizers:
        if isinstance(item, OptimizerSpec):
            resolved.append((item.name, item, None))
        elif item in known:
            resolved.append((item, known[item], None))
        else:
            resolved.append((str(item), None, f"unknown optimizer {item!r}; known: {', '.join(known)}"))
    names = [name for name, _, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer names must be unique, got {names}")
    return resolved


def compare_optimizers(
    histories: Sequence[UserHistory],
    *,
    memory: EpisodicMemory,
    lm: dspy.LM,
    optimizer_lm: dspy.LM | None = None,
    optimizers: Sequence[str | OptimizerSpec] = DEFAULT_OPTIMIZERS,
    n_recent: int = DEFAULT_RECENT,
    k: int = 5,
    seed: int = 0,
    progress: bool = True,
    quiet: bool = True,
) -> ComparisonReport:
    """Compile and score every optimizer on every user under identical conditions (see the module docstring).

    ``memory`` must already hold the histories. ``optimizer_lm`` (default: ``lm``) is the LM optimizers reason
    with (loss, reflection, instruction proposals); programs always answer with ``lm``. ``optimizers`` takes names
    from ``DEFAULT_OPTIMIZERS`` or ``OptimizerSpec`` objects; an unknown name is recorded as failed, not raised.
    ``quiet`` keeps DSPy's own progress bars and prints out of the output (logged at DEBUG); ``progress`` shows one
    bar over (user, optimizer) pairs. Users and optimizers run one after another, so wall times are comparable.
    """
    if n_recent < 1 or k < 1:
        raise ValueError(f"n_recent and k must be >= 1, got n_recent={n_recent}, k={k}")
    task = common_task(histories, "comparison")
    ids = [h.user_id for h in histories]
    if len(set(ids)) != len(ids):
        raise ValueError("user ids must be unique within a comparison")
    resolved = _resolve(optimizers)
    runnable = [(name, spec) for name, spec, error in resolved if spec is not None]
    metric = dspy_metric(task)
    reasoner = optimizer_lm or lm
    runs: dict[str, list[UserRun]] = {name: [] for name, _ in runnable}
    users: dict[str, dict[str, Any]] = {}
    persona_usage = LMUsage()
    started = time.perf_counter()

    with tqdm(total=len(histories) * len(runnable), desc=f"{task} optimizers", unit="run",
              disable=not progress) as bar:
        for history in histories:
            trainset = interaction_examples(history, n_recent)
            tests = query_examples(history)
            info: dict[str, Any] = {"trainset_ids": _ids(trainset), "valset_ids": _ids(trainset),
                                    "test_ids": _ids(tests), "initial_persona": None, "initial_persona_error": None}
            users[history.user_id] = info
            starts: dict[Start, dspy.Module | None] = {"none": initial_agent(history, memory, mode="none", k=k),
                                                       "initial": None}
            if any(spec.start == "initial" for _, spec in runnable):
                own = LMUsage()
                try:  # once per user, shared by every optimizer starting from it
                    with _counted(lm, persona_usage), _counted(lm, own):
                        persona = initial_persona(history)
                    starts["initial"] = initial_agent(history, memory, mode="rag", k=k, persona=persona)
                    info["initial_persona"] = persona
                except Exception as exc:  # every personalized optimizer fails on this user; the others go on
                    info["initial_persona_error"] = f"{type(exc).__name__}: {exc}"
                    logger.warning("initial persona failed for %s: %s", history.user_id, info["initial_persona_error"])
                info["initial_persona_usage"] = own.snapshot()
            for name, spec in runnable:
                bar.set_postfix_str(f"{history.user_id} {name}", refresh=False)
                base = starts[spec.start]
                if base is None:
                    run = UserRun(name, history.user_id, "failed", _ids(trainset), _ids(trainset), _ids(tests),
                                  stage="initial_persona", error_type="InitialPersonaError",
                                  error=str(info["initial_persona_error"]))
                else:
                    run = _run_one(spec, history, base, trainset, tests, task, metric, lm, reasoner, seed, quiet)
                runs[name].append(run)
                bar.update(1)

    results = []
    for name, spec, error in resolved:
        settings = spec.record() if spec is not None else {}
        results.append(_summarize(name, settings, error, task, len(histories), runs.get(name, [])))
    offline = is_offline(lm) or is_offline(reasoner)
    key, higher = primary_metric(task)
    return ComparisonReport(
        task=task, primary_metric=key, higher_is_better=higher, metric_keys=metric_keys(task), lm=describe_lm(lm),
        optimizer_lm=describe_lm(optimizer_lm) if optimizer_lm is not None else None, offline=offline,
        note=OFFLINE_NOTE if offline else None, n_recent=n_recent, k=k, seed=seed, user_ids=ids, users=users,
        persona_usage=persona_usage.snapshot(), results=results,
        wall_seconds=round(time.perf_counter() - started, 3), notes=[VALIDATION_NOTE, FAILED_PREDICTION_NOTE],
        versions=versions(), created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# --------------------------------------------------------------------------------------------- plotting


def plot_score_vs_calls(report: ComparisonReport, path: str | Path | None = None, *,
                        split: Literal["test", "val"] = "test") -> Any:
    """Primary score against LM calls per user spent to get the program (initial persona + compile).

    Returns a matplotlib Figure (built without pyplot, so no backend state changes); saves a PNG when ``path``
    is given. Evaluation calls are left out: they are the same few per user for every optimizer.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    for index, result in enumerate(report.results):
        score = (result.test if split == "test" else result.val).get(report.primary_metric)
        if score is None or result.compile_calls_per_user is None:
            continue
        calls = result.compile_calls_per_user + report.persona_calls_per_user(result)
        axes.scatter([calls], [score], s=60)
        # alternate label sides: optimizers with equal scores and similar costs would print over each other
        axes.annotate(result.name, (calls, score), textcoords="offset points", fontsize=9,
                      xytext=(6, 6) if index % 2 == 0 else (6, -14))
    direction = "higher" if report.higher_is_better else "lower"
    axes.set_xlabel("LM calls per user to build the program (initial persona + compile)")
    axes.set_ylabel(f"{split} {report.primary_metric} ({direction} is better)")
    title = f"{report.task}: {len(report.user_ids)} users, lm={report.lm.get('model')}"
    if report.offline:
        title += "\noffline stand-in: a plumbing check, not a model's score"
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if path is not None:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=120)
    return figure
