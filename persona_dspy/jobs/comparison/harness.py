"""Running a comparison: every contender on every user under identical conditions, failures recorded, not raised."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from typing import Any, Literal

import dspy

from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.agent.semantic_memory import initial_agent, initial_persona
from persona_dspy.console import progress_bar
from persona_dspy.data.examples import interaction_examples, query_examples
from persona_dspy.data.records import UserHistory, common_task
from persona_dspy.evaluation.evaluate import OFFLINE_NOTE, versions
from persona_dspy.evaluation.metrics import (
    aggregate_by_user,
    dspy_metric,
    metric_keys,
    per_example_score,
    primary_metric,
)
from persona_dspy.jobs.alignment import DEFAULT_RECENT
from persona_dspy.jobs.comparison.contenders import (
    DEFAULT_OPTIMIZERS,
    CompileInputs,
    OptimizerSpec,
    Start,
    default_specs,
)
from persona_dspy.jobs.comparison.report import (
    FAILED_PREDICTION_NOTE,
    GUARD_NOTE,
    VALIDATION_NOTE,
    ComparisonReport,
    OptimizerResult,
    UserRun,
)
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.report import describe_lm, is_offline
from persona_dspy.lm.usage import LMUsage, counting
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.optimizers.textual_loss import Metric
from persona_dspy.outputs.validation import OutputStats

logger = logging.getLogger(__name__)


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
def _counted(lm: dspy.LM, *counters: Any, lms: tuple[dspy.LM, ...] = ()) -> Iterator[None]:
    with dspy.context(lm=lm, adapter=default_adapter()), counting(*counters, lms=lms):
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
            invalid = getattr(prediction, "invalid", None)
            error = None if invalid is None else f"invalid answer: {invalid}"
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


def guard_result(program: dspy.Module, start: dspy.Module | None = None) -> int:
    """Pass a compiled program's persona through its guard; the personas the guard changed while compiling and now.

    The aligner and GEPA (through its instruction proposer) count their own interventions; MIPROv2, COPRO and the
    others write the predictors' instructions directly, so their result is guarded here. When nothing of the
    result's summary is usable, the starting program's summary is kept.
    """
    details = getattr(program, "comparison_details", None) or {}
    alignment = getattr(program, "alignment", None) or {}
    during = int(details.get("guard_interventions", 0) or alignment.get("guard_interventions", 0) or 0)
    if not isinstance(program, PersonaAgent) or program.mode == "none":
        return during
    fallback = start.persona_summary if isinstance(start, PersonaAgent) else None
    result = program.persona_guard.check(program.persona, fallback=fallback)
    if result.intervened:
        logger.warning("the compiled persona needed the guard (%d line(s) dropped%s)", len(result.dropped),
                       ", fixed parts restored" if result.restored_fixed_parts else "")
        program.persona = result.text
    return during + int(result.intervened)


def _copies(examples: Sequence[dspy.Example]) -> list[dspy.Example]:
    return [ex.copy() for ex in examples]


def _run_one(spec: OptimizerSpec, history: UserHistory, base: dspy.Module, trainset: list[dspy.Example],
             tests: list[dspy.Example], task: str, metric: Metric, lm: dspy.LM, optimizer_lm: dspy.LM, seed: int,
             quiet: bool) -> UserRun:
    """Compile one copy of the starting program, then score it; an exception becomes a recorded failure."""
    train = _copies(trainset)
    val = list(train)  # the same objects: optimizers that cache answers per example share them (as the aligner)
    run = UserRun(spec.name, history.user_id, "ok", _ids(train), _ids(val), _ids(tests))
    compile_usage, eval_usage, stats = LMUsage(), LMUsage(), OutputStats()
    stage = "compile"
    started = time.perf_counter()
    try:
        inputs = CompileInputs(history, base.deepcopy(), train, val, metric, lm, optimizer_lm, seed)
        with _quiet(quiet), _counted(lm, compile_usage, stats, lms=(optimizer_lm,)):
            program = spec.compile(inputs)
        run.compile_seconds = round(time.perf_counter() - started, 3)
        run.guard_interventions = guard_result(program, base)
        run.instructions, run.n_demos = _program_text(program)
        alignment = getattr(program, "alignment", None)
        if isinstance(alignment, dict):
            run.details = {"alignment": {k: v for k, v in alignment.items() if k != "lm_usage"}}
        if isinstance(getattr(program, "comparison_details", None), dict):
            run.details = dict(program.comparison_details)
        started = time.perf_counter()
        with _quiet(quiet), _counted(lm, eval_usage, stats):
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
    run.compile_usage, run.eval_usage, run.outputs = compile_usage.snapshot(), eval_usage.snapshot(), stats.snapshot()
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
        guard_interventions=sum(u.guard_interventions for u in runs), outputs=_merged(u.outputs for u in runs),
    )


def _merged(snapshots: Any) -> dict[str, Any]:
    """Output counts (``OutputStats.snapshot()``) summed."""
    total = OutputStats()
    for snapshot in snapshots:
        total.merge(snapshot)
    return total.snapshot()


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
    progress: bool | None = None,
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

    with progress_bar(len(histories) * len(runnable), f"{task} optimizers", progress, unit="run") as bar:
        for history in histories:
            trainset = interaction_examples(history, n_recent)
            tests = query_examples(history)
            info: dict[str, Any] = {"trainset_ids": _ids(trainset), "valset_ids": _ids(trainset),
                                    "test_ids": _ids(tests), "initial_persona": None, "initial_persona_error": None}
            users[history.user_id] = info
            starts: dict[Start, dspy.Module | None] = {"none": initial_agent(history, memory, mode="none", k=k),
                                                       "initial": None}
            if any(spec.start == "initial" for _, spec in runnable):
                own, own_outputs = LMUsage(), OutputStats()
                try:  # once per user, shared by every optimizer starting from it
                    with _counted(lm, persona_usage, own, own_outputs):
                        persona = initial_persona(history)
                    starts["initial"] = initial_agent(history, memory, k=k, persona=persona)
                    info["initial_persona"] = persona
                except Exception as exc:  # every personalized optimizer fails on this user; the others go on
                    info["initial_persona_error"] = f"{type(exc).__name__}: {exc}"
                    logger.warning("initial persona failed for %s: %s", history.user_id, info["initial_persona_error"])
                info["initial_persona_usage"] = own.snapshot()
                info["initial_persona_outputs"] = own_outputs.snapshot()
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
        output_totals=_merged([*(r.outputs for r in results),
                               *(u.get("initial_persona_outputs") or {} for u in users.values())]),
        wall_seconds=round(time.perf_counter() - started, 3),
        notes=[VALIDATION_NOTE, GUARD_NOTE, FAILED_PREDICTION_NOTE],
        versions=versions(), created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
