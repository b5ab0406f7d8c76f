"""Tuning PersonaAligner on LaMP dev users: the Optuna objective, and the run the CLI calls.

One trial applies one configuration (batch size, iterations, retrieved k, temperature) to every dev user: align,
then answer the held-out queries through ``evaluation.evaluate``. The score is LaMP's primary metric made
higher-is-better (MAE negated); the cost is LM calls per user over the whole trial. Initial personas do not depend
on the searched settings, so they are summarised once and reported apart. A trial in which any user fails raises,
so Optuna records it as failed: a score over fewer users would not compare with the others.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
import optuna
from optuna.trial import TrialState

from persona_dspy.agent.persona_agent import DEFAULT_MODE, AgentMode
from persona_dspy.agent.semantic_memory import initial_agent, initial_persona
from persona_dspy.console import progress_bar
from persona_dspy.data.records import UserHistory, common_task
from persona_dspy.data.tasks import get_task
from persona_dspy.evaluation.evaluate import OFFLINE_NOTE, evaluate
from persona_dspy.evaluation.metrics import primary_metric
from persona_dspy.jobs.alignment import DEFAULT_RECENT, align_user
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.config import LMConfig
from persona_dspy.lm.report import describe_lm, is_offline
from persona_dspy.lm.usage import LMUsage, counting
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.optimizers.optuna_study import (
    Algorithm,
    AlignerSearchSpace,
    TrialOutcome,
    best_trial,
    completed_trials,
    pareto_front,
    trial_summary,
    tune,
)
from persona_dspy.outputs.validation import OutputStats

logger = logging.getLogger(__name__)

LMFactory = Callable[[float], dspy.LM]
"""temperature -> the task LM for one trial."""

SEARCHED = ("batch_size", "iterations", "k", "temperature")


def alignable(histories: Sequence[UserHistory], n_recent: int) -> list[UserHistory]:
    """Users with at least one interaction before their first query (the others cannot be aligned)."""
    kept = [h for h in histories if h.recent_interactions(n_recent)]
    if len(kept) < len(histories):
        logger.warning("tuning skips %d users with no history before their first query", len(histories) - len(kept))
    return kept


def _single_task(histories: Sequence[UserHistory]) -> str:
    return common_task(histories, "tuning run")


def aligner_space(n_recent: int = DEFAULT_RECENT, **bounds: Any) -> AlignerSearchSpace:
    """The search space for users aligned on ``n_recent`` interactions: ``batch_size`` up to ``n_recent`` by
    default, and never beyond (a larger batch is the same batch, so its trials would only repeat)."""
    space = AlignerSearchSpace(**{"batch_size": (1, max(1, n_recent)), **bounds})
    check_batch_bounds(space, n_recent)
    return space


def check_batch_bounds(space: AlignerSearchSpace, n_recent: int) -> None:
    """Refuse batch sizes above ``n_recent``: trials there would repeat the ``n_recent`` ones at full cost."""
    if space.batch_size[1] > n_recent:
        raise ValueError(f"batch_size bounds {space.batch_size} reach above n_recent={n_recent}: a user is aligned "
                         f"on at most {n_recent} recent interactions, so a larger batch_size is a no-op; "
                         f"use an upper bound <= {n_recent}")


def summarise_initial_personas(histories: Sequence[UserHistory], lm: dspy.LM, *,
                               workers: int = 4) -> tuple[dict[str, str], dict[str, Any]]:
    """Each user's initial persona (one LM call each), and the usage of those calls."""
    usage, outputs = LMUsage(), OutputStats()

    def summarise(history: UserHistory) -> tuple[str, str]:
        with dspy.context(lm=lm, adapter=default_adapter()), counting(usage, outputs):
            return history.user_id, initial_persona(history)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(histories))),
                            thread_name_prefix="persona-summary") as pool:
        # each user runs in its own copy of the caller's context (taken here, in the caller's thread)
        contexts = [contextvars.copy_context() for _ in histories]
        personas = dict(pool.map(lambda ctx, h: ctx.run(summarise, h), contexts, histories))
    return personas, {**usage.snapshot(), "outputs": outputs.snapshot()}


def aligner_objective(
    histories: Sequence[UserHistory],
    *,
    memory: EpisodicMemory,
    lm_factory: LMFactory,
    optimizer_lm: dspy.LM | None = None,
    n_recent: int = DEFAULT_RECENT,
    mode: AgentMode = DEFAULT_MODE,
    workers: int = 4,
    persona_lm: dspy.LM | None = None,
    **fixed_settings: Any,
) -> Callable[[dict[str, Any]], TrialOutcome]:
    """The objective for ``persona_dspy.optimizers.optuna_study.tune`` (see the module docstring).

    ``memory`` must already hold the histories. ``optimizer_lm`` None: loss and update use the trial's task LM
    (so the tuned temperature applies to them too). ``persona_lm`` summarises the initial personas, once, at the
    first trial (default ``lm_factory(0.0)``). ``fixed_settings`` go to PersonaAligner unchanged in every trial
    (e.g. ``candidates_per_step``, ``max_persona_words``). Search ``batch_size`` within ``aligner_space(n_recent)``.
    """
    users = alignable(histories, n_recent)
    task = _single_task(users)
    metric, higher_is_better = primary_metric(task)
    clash = set(fixed_settings) & set(SEARCHED)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))} are searched; they cannot also be fixed")
    initial: dict[str, Any] = {}  # filled by the first trial that gets that far, then shared by all

    def initial_personas() -> tuple[dict[str, str], dict[str, Any]]:
        if not initial:
            if mode == "none":  # no persona to summarise
                initial.update(personas={}, usage=LMUsage().snapshot())
            else:
                lm = lm_factory(0.0) if persona_lm is None else persona_lm
                personas, usage = summarise_initial_personas(users, lm, workers=workers)
                initial.update(personas=personas, usage=usage)
        return initial["personas"], initial["usage"]

    def objective(settings: dict[str, Any]) -> TrialOutcome:
        settings = dict(settings)
        k = int(settings.pop("k"))
        personas, persona_usage = initial_personas()
        lm = lm_factory(float(settings.pop("temperature")))
        aligner_settings = {**fixed_settings, **settings}

        def aligned_agent(history: UserHistory) -> Any:
            start = initial_agent(history, memory, mode=mode, k=k, persona=personas.get(history.user_id))
            return align_user(history, memory, mode=mode, k=k, n_recent=n_recent, optimizer_lm=optimizer_lm,
                              start=start, **aligner_settings)

        report = evaluate(users, memory=memory, mode=mode, lm=lm, workers=workers, k=k, agent_factory=aligned_agent,
                          progress=False, max_failures=1)
        if not report.complete:
            failure = report.failures[0] if report.failures else None
            reason = f"{failure.user_id} at {failure.stage}: {failure.error_type}: {failure.error}" if failure else ""
            raise RuntimeError(f"{len(report.failures)} user(s) failed, {len(report.skipped_users)} skipped; {reason}")
        value = report.overall[metric]
        return TrialOutcome(
            score=value if higher_is_better else -value,
            lm_calls_per_user=report.calls / len(users),
            details={"task": task, "metric": metric, "metric_value": value, "higher_is_better": higher_is_better,
                     "overall": report.overall, "n_users": len(users), "n_queries": report.n_queries,
                     "lm_calls": report.calls, "tokens": report.tokens, "seconds": report.wall_seconds,
                     "offline": report.offline, "initial_persona_usage": persona_usage,
                     "outputs": report.output_totals, "outputs_per_user": report.outputs},
        )

    return objective


def users_fingerprint(histories: Sequence[UserHistory]) -> str:
    """Which users a study was tuned on: a resume on other users would mix incomparable scores."""
    ids = sorted(h.user_id for h in histories)
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


def run_tuning(
    task: str,
    histories: Sequence[UserHistory],
    memory: EpisodicMemory,
    *,
    lm: LMConfig,
    storage: str,
    study_name: str,
    n_trials: int,
    optimizer_lm: LMConfig | None = None,
    max_lm_calls_per_user: float | None = None,
    multi_objective: bool = False,
    algorithm: Algorithm = "tpe",
    seed: int = 0,
    n_recent: int = DEFAULT_RECENT,
    mode: AgentMode = DEFAULT_MODE,
    workers: int = 4,
    max_failed_trials: int | None = None,
    space: AlignerSearchSpace | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tune on ``histories`` (already in ``memory``) and summarise the study, for ``persona-dspy tune``.

    Builds the task LM per trial from ``lm`` at the trial's temperature (``lm.copy(temperature=...)``), and
    ``optimizer_lm`` (``lm.config.optimizer_lm_config``; None: the trial's task LM) once. LM settings are checked
    before any trial runs. The
    initial personas are summarised once, with the task LM at temperature 0. ``space`` defaults to
    ``aligner_space(n_recent)``; one whose batch_size reaches above ``n_recent`` is refused.
    """
    task = get_task(task).name
    if space is None:
        space = aligner_space(n_recent)
    else:
        check_batch_bounds(space, n_recent)
    users = alignable(histories, n_recent)
    if _single_task(users) != task:
        raise ValueError(f"the users are from {_single_task(users)}, not {task}")

    def lm_factory(temperature: float) -> dspy.LM:
        return build_lm(lm.copy(temperature=temperature))

    probe = lm_factory(0.0)  # an unusable model or api_base fails here, not in every trial
    loss_lm = build_lm(optimizer_lm) if optimizer_lm is not None else None
    context = {"task": task, "users": users_fingerprint(users), "n_users": len(users), "n_recent": n_recent,
               "agent_mode": mode, "lm": probe.model, "optimizer_lm": loss_lm.model if loss_lm else None}
    objective = aligner_objective(users, memory=memory, lm_factory=lm_factory, optimizer_lm=loss_lm,
                                  n_recent=n_recent, mode=mode, workers=workers, persona_lm=probe)
    with progress_bar(n_trials, f"tune {task}", progress, unit="trial") as bar:
        def counted(settings: dict[str, Any]) -> Any:  # a trial takes minutes on a real model: show each one end
            try:
                return objective(settings)
            finally:
                bar.update(1)
                logger.info("trial with %s finished", settings)

        study = tune(counted, storage=storage, study_name=study_name, n_trials=n_trials,
                     max_lm_calls_per_user=max_lm_calls_per_user, multi_objective=multi_objective, seed=seed,
                     space=space, algorithm=algorithm, max_failed_trials=max_failed_trials, context=context)
    return tuning_summary(study, task=task, lm=probe, n_trials=n_trials, max_lm_calls_per_user=max_lm_calls_per_user)


def tuning_summary(study: optuna.Study, *, task: str, lm: dspy.LM, n_trials: int,
                   max_lm_calls_per_user: float | None = None) -> dict[str, Any]:
    """Best settings with score, raw metric and cost; trial counts; every completed trial (and the Pareto front)."""
    metric, higher_is_better = primary_metric(task)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    offline = is_offline(lm)
    summary: dict[str, Any] = {
        "task": task, "study_name": study.study_name,
        "mode": "multi_objective" if len(study.directions) > 1 else "single_objective",
        "n_trials": n_trials, "trials_done": len(completed_trials(study)),
        "trials_failed": states.count(TrialState.FAIL), "max_lm_calls_per_user": max_lm_calls_per_user,
        "metric": metric, "higher_is_better": higher_is_better,
        "score_note": "score is the metric" if higher_is_better else f"score is -{metric} (higher is better)",
        "lm": describe_lm(lm), "offline": offline, "note": OFFLINE_NOTE if offline else None,
        "best_settings": None, "best_score": None, "best_metric_value": None, "lm_calls_per_user": None,
        "best_trial": None,
    }
    try:
        best = best_trial(study, max_lm_calls_per_user)
    except ValueError as exc:
        summary["no_best_reason"] = str(exc)
        logger.warning("%s", exc)
    else:
        row = trial_summary(best)
        summary.update(best_settings=row["settings"], best_score=row["score"],
                       best_metric_value=row.get("details", {}).get("metric_value"),
                       lm_calls_per_user=row["lm_calls_per_user"], best_trial=best.number)
    budget = max_lm_calls_per_user
    rows = list(map(trial_summary, completed_trials(study)))
    summary["trials"] = [
        {"number": row["number"], "settings": row["settings"], "score": row["score"],
         "lm_calls_per_user": row["lm_calls_per_user"],
         "feasible": budget is None or row["lm_calls_per_user"] <= budget,
         "invalid_outputs": sum(((row.get("details") or {}).get("outputs") or {}).get("invalid", {}).values())}
        for row in rows
    ]
    totals = OutputStats()  # every completed trial's outputs, and the initial personas' (summarised once)
    for row in rows:
        totals.merge((row.get("details") or {}).get("outputs") or {})
    initial = next(((row.get("details") or {}).get("initial_persona_usage") for row in rows), None) or {}
    totals.merge(initial.get("outputs") or {})
    summary["output_totals"] = totals.snapshot()
    if len(study.directions) > 1:
        summary["pareto_front"] = [
            {key: value for key, value in trial_summary(t).items() if key != "details"} for t in pareto_front(study)
        ]
    return summary
