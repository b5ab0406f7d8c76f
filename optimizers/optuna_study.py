"""Tuning an aligner's settings with Optuna: score against LM calls, resumable from an SQLite study.

Cost enters as a constraint (one objective, ``max_lm_calls_per_user``: trials above it are infeasible) or as a
second objective (a Pareto front; ``best_settings`` takes its best trial within the budget). ``n_trials`` is a
target, so a rerun after an interruption only does the remainder; a failing trial is recorded and replaced, up to
``max_failed_trials``. A study refuses to resume with another mode, budget, space or context, and its sampler's
seed moves with the trials already held, so a resumed run does not replay them.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

SCORE_ATTR = "score"
CALLS_ATTR = "lm_calls_per_user"
DETAILS_ATTR = "details"
ERROR_ATTR = "error"
FEASIBLE_ATTR = "feasible"
STUDY_ATTR = "tuning"
"""Study user attribute holding what a resumed run must agree with (mode, budget, space, context)."""

HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
NSGA2_POPULATION = 10
"""NSGA-II's default of 50 per generation is more trials than an LLM budget usually allows."""

Algorithm = Literal["tpe", "nsga2"]


class SearchSpace(Protocol):
    """Suggests one configuration per trial; ``bounds`` is what a resumed study must agree with."""

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...

    def bounds(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class AlignerSearchSpace:
    """PersonaAligner's settings plus retrieval depth and task-LM temperature (inclusive bounds).

    ``temperature_step``: None samples temperature continuously; a step (e.g. 0.1) makes equal settings recur,
    which helps when the objective is cached or deterministic.
    """

    batch_size: tuple[int, int] = (1, 5)
    iterations: tuple[int, int] = (1, 5)
    k: tuple[int, int] = (1, 10)
    temperature: tuple[float, float] = (0.0, 1.0)
    temperature_step: float | None = None

    def __post_init__(self) -> None:
        for name, low_limit in (("batch_size", 1), ("iterations", 0), ("k", 1)):
            low, high = getattr(self, name)
            if not (isinstance(low, int) and isinstance(high, int)) or low < low_limit or low > high:
                raise ValueError(f"{name} bounds must be integers with {low_limit} <= low <= high, got {(low, high)}")
        low, high = self.temperature
        if not 0.0 <= low <= high <= 2.0:
            raise ValueError(f"temperature bounds must satisfy 0 <= low <= high <= 2, got {(low, high)}")
        if self.temperature_step is not None and self.temperature_step <= 0:
            raise ValueError(f"temperature_step must be positive (or None), got {self.temperature_step}")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "batch_size": trial.suggest_int("batch_size", *self.batch_size),
            "iterations": trial.suggest_int("iterations", *self.iterations),
            "k": trial.suggest_int("k", *self.k),
            "temperature": trial.suggest_float("temperature", *self.temperature, step=self.temperature_step),
        }

    def bounds(self) -> dict[str, Any]:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class TrialOutcome:
    """What one configuration achieved: ``score`` (higher is better) and its cost in LM calls per user.

    ``details`` (JSON-serialisable) is stored with the trial for reports, e.g. the raw metric before a sign flip.
    """

    score: float
    lm_calls_per_user: float
    details: Mapping[str, Any] = field(default_factory=dict)


Objective = Callable[[dict[str, Any]], "TrialOutcome | tuple[float, float]"]


def _as_outcome(result: Any) -> TrialOutcome:
    """Accept a TrialOutcome or a plain ``(score, calls)`` pair; reject values a study cannot rank."""
    if not isinstance(result, TrialOutcome):
        score, calls = result
        result = TrialOutcome(float(score), float(calls))
    if not math.isfinite(result.score):
        raise ValueError(f"the objective returned a non-finite score ({result.score})")
    if not math.isfinite(result.lm_calls_per_user) or result.lm_calls_per_user < 0:
        raise ValueError(f"the objective returned an invalid LM call count ({result.lm_calls_per_user})")
    return result


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna stores user attributes as JSON: anything else is turned into its string form."""
    return json.loads(json.dumps(dict(data), default=str))


def make_sampler(seed: int, *, algorithm: Algorithm = "tpe") -> optuna.samplers.BaseSampler:
    """A seeded sampler. Both read the budget from ``trial.constraints`` (Optuna 5's ``Trial.set_constraint``; the
    samplers' ``constraints_func`` is deprecated since 5.0), so one sampler serves every mode."""
    if algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=NSGA2_POPULATION)
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown algorithm {algorithm!r}; use 'tpe' or 'nsga2'")


def open_storage(storage: str | BaseStorage) -> BaseStorage:
    """An RDB storage with heartbeats (a killed run's trial is failed on resume); SQLite folders are created."""
    if not isinstance(storage, str):
        return storage
    if storage.startswith("sqlite:///"):
        path = storage.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are flagged experimental; what they do here is tested
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def _existing_trials(storage: BaseStorage, study_name: str) -> int:
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def _check_resume(study: optuna.Study, expected: dict[str, Any]) -> None:
    """A study is resumed only with the mode, budget, space and context it was created with."""
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise ValueError(f"study {study.study_name!r} already has trials but was not created by tune(); "
                             "use another study name")
        study.set_user_attr(STUDY_ATTR, expected)
        return
    different = sorted(key for key in set(stored) | set(expected) if stored.get(key) != expected.get(key))
    if different:
        detail = "; ".join(f"{key}: stored {stored.get(key)!r}, now {expected.get(key)!r}" for key in different)
        raise ValueError(f"study {study.study_name!r} was created with other settings ({detail}); "
                         "resume it with the same ones or use another study name")


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def tune(
    objective: Objective,
    *,
    storage: str | BaseStorage,
    study_name: str,
    n_trials: int,
    max_lm_calls_per_user: float | None = None,
    multi_objective: bool = False,
    seed: int = 0,
    space: SearchSpace | None = None,
    algorithm: Algorithm = "tpe",
    max_failed_trials: int | None = None,
    context: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Run (or resume) the study until it holds ``n_trials`` completed trials; see the module docstring.

    ``max_failed_trials``: failures tolerated in this call before it gives up (default ``n_trials``).
    ``context``: JSON-serialisable facts the trials depend on (task, users, model); a resume must match them.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if max_lm_calls_per_user is not None and not max_lm_calls_per_user > 0:
        raise ValueError(f"max_lm_calls_per_user must be positive (or None), got {max_lm_calls_per_user}")
    if algorithm == "nsga2" and not multi_objective:
        logger.info("NSGA-II with a single objective: it works, but TPE usually needs fewer trials")
    space = space or AlignerSearchSpace()
    max_failed = n_trials if max_failed_trials is None else max_failed_trials
    budget = None if max_lm_calls_per_user is None else float(max_lm_calls_per_user)
    expected = _jsonable({"mode": "multi_objective" if multi_objective else "single_objective",
                          "max_lm_calls_per_user": budget, "space": space.bounds(), "context": dict(context or {})})

    store = open_storage(storage)
    sampler = make_sampler(seed + _existing_trials(store, study_name), algorithm=algorithm)
    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]
    study = optuna.create_study(storage=store, study_name=study_name, sampler=sampler, directions=directions,
                                load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ValueError(f"study {study_name!r} optimizes {[d.name.lower() for d in study.directions]}, "
                         f"not {directions}; use another study name")
    _check_resume(study, expected)

    failures = 0

    def run_trial(trial: optuna.Trial) -> float | tuple[float, float]:
        nonlocal failures
        settings = space.suggest(trial)
        try:
            outcome = _as_outcome(objective(dict(settings)))
        except BaseException as exc:  # recorded on the trial; Optuna marks it FAIL (and re-raises interrupts)
            failures += 1
            trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}")
            logger.warning("trial %d failed with %s: %s: %s", trial.number, settings, type(exc).__name__, exc)
            raise
        trial.set_user_attr(SCORE_ATTR, outcome.score)
        trial.set_user_attr(CALLS_ATTR, outcome.lm_calls_per_user)
        if outcome.details:
            trial.set_user_attr(DETAILS_ATTR, _jsonable(outcome.details))
        if budget is not None:
            trial.set_user_attr(FEASIBLE_ATTR, outcome.lm_calls_per_user <= budget)
            trial.set_constraint(CALLS_ATTR, outcome.lm_calls_per_user - budget)  # feasible when <= 0
        return (outcome.score, outcome.lm_calls_per_user) if multi_objective else outcome.score

    while (done := len(completed_trials(study))) < n_trials:
        if failures >= max(max_failed, 1):
            logger.warning("stopping study %r after %d failed trials (%d of %d completed)", study_name, failures,
                           done, n_trials)
            break
        study.optimize(run_trial, n_trials=1, catch=(Exception,))
    return study


# -- reading a study ---------------------------------------------------------------------------------------------


def _budget(study: optuna.Study, max_lm_calls_per_user: float | None) -> float | None:
    if max_lm_calls_per_user is not None:
        return float(max_lm_calls_per_user)
    return (study.user_attrs.get(STUDY_ATTR) or {}).get("max_lm_calls_per_user")


def _score(trial: FrozenTrial) -> float:
    return float(trial.user_attrs.get(SCORE_ATTR, trial.values[0]))


def _calls(trial: FrozenTrial) -> float:
    if CALLS_ATTR in trial.user_attrs:
        return float(trial.user_attrs[CALLS_ATTR])
    return float(trial.values[1]) if len(trial.values) > 1 else math.inf


def feasible_trials(study: optuna.Study, max_lm_calls_per_user: float | None = None) -> list[FrozenTrial]:
    """Completed trials within the budget (the study's own unless one is given)."""
    budget = _budget(study, max_lm_calls_per_user)
    return [t for t in completed_trials(study) if budget is None or _calls(t) <= budget]


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials no other trial beats on both score and calls, by ascending calls."""
    trials = completed_trials(study)
    front = [t for t in trials
             if not any(_score(o) >= _score(t) and _calls(o) <= _calls(t)
                        and (_score(o) > _score(t) or _calls(o) < _calls(t)) for o in trials)]
    return sorted(front, key=lambda t: (_calls(t), -_score(t), t.number))


def best_trial(study: optuna.Study, max_lm_calls_per_user: float | None = None) -> FrozenTrial:
    """The highest score within the budget; ties go to fewer calls, then to the earlier trial.

    That trial is always on the Pareto front (anything dominating it would be within the budget and score at
    least as high with fewer calls), so one rule serves both modes. Raises ValueError when nothing is feasible.
    """
    candidates = feasible_trials(study, max_lm_calls_per_user)
    if not candidates:
        budget = _budget(study, max_lm_calls_per_user)
        done = completed_trials(study)
        if not done:
            raise ValueError(f"study {study.study_name!r} has no completed trial yet")
        cheapest = min(_calls(t) for t in done)
        raise ValueError(f"no completed trial of study {study.study_name!r} is within {budget:g} LM calls per user "
                         f"(the cheapest used {cheapest:g})")
    return min(candidates, key=lambda t: (-_score(t), _calls(t), t.number))


def best_settings(study: optuna.Study, max_lm_calls_per_user: float | None = None) -> dict[str, Any]:
    """The settings of ``best_trial``: a feasible trial always, never one over the budget."""
    return dict(best_trial(study, max_lm_calls_per_user).params)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as plain data for reports."""
    return {"number": trial.number, "settings": dict(trial.params), "score": _score(trial),
            "lm_calls_per_user": _calls(trial), **({"details": trial.user_attrs[DETAILS_ATTR]}
                                                  if DETAILS_ATTR in trial.user_attrs else {})}
