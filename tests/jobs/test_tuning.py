"""Optuna tuning of the persona aligner: recorded outcomes, resumability, failures, the LM-call budget, Pareto fronts.

The generic study tests use a synthetic objective (exact, instant); the end-to-end tests run the real objective on
three LaMP_3 users with the offline stand-in LM, whose scores are plumbing checks, never a model's accuracy.
"""

from __future__ import annotations

import math
import time

import dspy
import optuna
import pytest
from optuna.trial import TrialState
from persona_dspy.optimizers import optuna_study as tuning
from persona_dspy.optimizers.optuna_study import (
    AlignerSearchSpace,
    TrialOutcome,
    best_settings,
    best_trial,
    completed_trials,
    pareto_front,
    tune,
)

from persona_dspy.agent.semantic_memory import initial_agent, initial_persona
from persona_dspy.data.examples import query_examples
from persona_dspy.evaluation.metrics import aggregate_by_user
from persona_dspy.jobs import tuning as tuning_job
from persona_dspy.jobs.alignment import align_user
from persona_dspy.jobs.tuning import aligner_objective, aligner_space, run_tuning
from persona_dspy.lm.config import lm_config
from persona_dspy.lm.usage import LMUsage
from persona_dspy.testing.offline_lm import OfflineEngine, offline_lm

optuna.logging.set_verbosity(optuna.logging.WARNING)


def synthetic_calls(settings: dict) -> float:
    return 1 + settings["iterations"] * (settings["batch_size"] + 2)  # 4 .. 36, like the aligner's cost shape


def synthetic_score(settings: dict) -> float:
    """Grows with cost, so the unconstrained optimum is expensive and a budget has to change the answer."""
    return settings["iterations"] + settings["batch_size"] + settings["k"] / 10 - abs(settings["temperature"] - 0.3)


class Synthetic:
    """A counting objective; ``fail_on`` maps a call number (1-based) to the exception that call raises."""

    def __init__(self, fail_on: dict[int, BaseException] | None = None) -> None:
        self.calls = 0
        self.seen: list[dict] = []
        self.fail_on = fail_on or {}

    def __call__(self, settings: dict) -> TrialOutcome:
        self.calls += 1
        self.seen.append(dict(settings))
        if self.calls in self.fail_on:
            raise self.fail_on[self.calls]
        return TrialOutcome(synthetic_score(settings), synthetic_calls(settings), {"note": "synthetic"})


def sqlite(tmp_path, name: str = "study.db") -> str:
    return f"sqlite:///{tmp_path / name}"


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


# -- the search space ----------------------------------------------------------------------------------------------


def test_space_bounds_are_respected(tmp_path):
    narrow = AlignerSearchSpace(batch_size=(2, 3), iterations=(1, 1), k=(4, 6), temperature=(0.2, 0.4),
                                temperature_step=0.1)
    objective = Synthetic()
    study = tune(objective, storage=sqlite(tmp_path), study_name="narrow", n_trials=12, space=narrow, seed=3)
    assert len(completed_trials(study)) == 12
    for settings in objective.seen:
        assert set(settings) == {"batch_size", "iterations", "k", "temperature"}
        assert all(isinstance(settings[name], int) for name in ("batch_size", "iterations", "k"))
        assert 2 <= settings["batch_size"] <= 3 and settings["iterations"] == 1 and 4 <= settings["k"] <= 6
        assert any(math.isclose(settings["temperature"], t) for t in (0.2, 0.3, 0.4))

    default = AlignerSearchSpace()
    for seed in range(20):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        settings = default.suggest(trial)
        assert 1 <= settings["batch_size"] <= 5 and 1 <= settings["iterations"] <= 5 and 1 <= settings["k"] <= 10
        assert 0.0 <= settings["temperature"] <= 1.0


@pytest.mark.parametrize("bounds", [{"batch_size": (0, 3)}, {"k": (5, 2)}, {"temperature": (-0.1, 1.0)},
                                    {"temperature": (0.5, 0.2)}, {"iterations": (1.0, 3)}, {"temperature_step": 0}])
def test_space_rejects_bad_bounds(bounds):
    with pytest.raises(ValueError):
        AlignerSearchSpace(**bounds)


# -- the study -----------------------------------------------------------------------------------------------------


def test_every_trial_records_score_and_calls(tmp_path):
    objective = Synthetic()
    study = tune(objective, storage=sqlite(tmp_path), study_name="plain", n_trials=5)
    trials = completed_trials(study)
    assert len(trials) == 5 and objective.calls == 5 and states(study) == [TrialState.COMPLETE] * 5
    for trial in trials:
        assert trial.user_attrs["score"] == trial.value == pytest.approx(synthetic_score(trial.params))
        assert trial.user_attrs["lm_calls_per_user"] == synthetic_calls(trial.params)
        assert trial.user_attrs["details"] == {"note": "synthetic"}
    best = max(trials, key=lambda t: t.value)
    assert best_settings(study) == best.params  # no budget: simply the highest score


def test_resume_completes_the_remainder(tmp_path):
    url = sqlite(tmp_path)
    first = Synthetic()
    tune(first, storage=url, study_name="resumable", n_trials=2, seed=7)
    assert first.calls == 2

    second = Synthetic()  # a fresh objective, storage and study object: as after a restart
    study = tune(second, storage=url, study_name="resumable", n_trials=4, seed=7)
    assert second.calls == 2  # the remainder, not 4 more
    assert len(completed_trials(study)) == 4 and len(study.trials) == 4
    assert study.trials[2].params != study.trials[0].params  # the resumed sampler does not replay the first run

    third = Synthetic()
    again = tune(third, storage=url, study_name="resumable", n_trials=4, seed=7)
    assert third.calls == 0 and len(again.trials) == 4
    loaded = optuna.load_study(study_name="resumable", storage=url)
    assert [t.params for t in loaded.trials] == [t.params for t in study.trials]


def test_interrupted_run_resumes(tmp_path):
    url = sqlite(tmp_path)
    crashing = Synthetic(fail_on={3: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        tune(crashing, storage=url, study_name="crash", n_trials=4)
    study = optuna.load_study(study_name="crash", storage=url)
    assert states(study) == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert study.trials[2].user_attrs["error"] == "KeyboardInterrupt: "

    study = tune(Synthetic(), storage=url, study_name="crash", n_trials=4)
    assert len(completed_trials(study)) == 4 and states(study).count(TrialState.FAIL) == 1


def test_a_killed_runs_trial_is_failed_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tuning, "GRACE_SECONDS", 1)
    url = sqlite(tmp_path)
    tune(Synthetic(), storage=url, study_name="killed", n_trials=1)
    storage = tuning.open_storage(url)  # a trial that started and then lost its process (kill -9)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna expects heartbeats under optimize(), as tune() runs
        orphan = optuna.load_study(study_name="killed", storage=storage).ask()
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.2)  # the database clock has 1 s resolution: the heartbeat must be more than 1 s old
    study = tune(Synthetic(), storage=url, study_name="killed", n_trials=2)
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    objective = Synthetic(fail_on={2: RuntimeError("server said no")})
    study = tune(objective, storage=sqlite(tmp_path), study_name="flaky", n_trials=4)
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 3
    failed = study.trials[1]
    assert failed.user_attrs["error"] == "RuntimeError: server said no"
    assert "score" not in failed.user_attrs and failed.values is None
    assert best_trial(study).state is TrialState.COMPLETE


def test_a_dead_objective_stops_instead_of_looping(tmp_path):
    def dead(settings: dict) -> TrialOutcome:
        raise ConnectionError("connection refused")

    study = tune(dead, storage=sqlite(tmp_path), study_name="dead", n_trials=10, max_failed_trials=3)
    assert states(study) == [TrialState.FAIL] * 3
    with pytest.raises(ValueError, match="no completed trial"):
        best_settings(study)


def test_non_finite_scores_fail_the_trial(tmp_path):
    study = tune(lambda settings: (math.nan, 3.0), storage=sqlite(tmp_path), study_name="nan", n_trials=1,
                 max_failed_trials=1)
    assert states(study) == [TrialState.FAIL]
    assert "non-finite score" in study.trials[0].user_attrs["error"]


def test_the_budget_constraint_marks_trials_infeasible(tmp_path):
    budget = 15.0
    study = tune(Synthetic(), storage=sqlite(tmp_path), study_name="budget", n_trials=16,
                 max_lm_calls_per_user=budget, seed=1)
    trials = completed_trials(study)
    assert len(trials) == 16
    for trial in trials:
        calls = trial.user_attrs["lm_calls_per_user"]
        assert trial.user_attrs["feasible"] is (calls <= budget)
        assert trial.constraints == {"lm_calls_per_user": calls - budget}  # what the sampler learns from
    feasible = [t for t in trials if t.user_attrs["feasible"]]
    infeasible = [t for t in trials if not t.user_attrs["feasible"]]
    assert feasible and infeasible

    best = best_trial(study)
    assert best.user_attrs["lm_calls_per_user"] <= budget
    assert best.user_attrs["score"] == max(t.user_attrs["score"] for t in feasible)
    assert best_settings(study) == best.params
    top = max(trials, key=lambda t: t.value)
    assert not top.user_attrs["feasible"] and best_settings(study) != top.params  # the budget changed the answer
    assert study.best_trial.number == best.number  # Optuna itself agrees: it ranks feasible trials only

    tighter = best_settings(study, max_lm_calls_per_user=8)  # an explicit budget overrides the study's
    assert synthetic_calls(tighter) <= 8
    with pytest.raises(ValueError, match="within 1 LM calls"):
        best_settings(study, max_lm_calls_per_user=1)


def test_a_study_resumes_only_with_its_own_settings(tmp_path):
    url = sqlite(tmp_path)
    tune(Synthetic(), storage=url, study_name="fixed", n_trials=1, max_lm_calls_per_user=10, context={"task": "A"})
    with pytest.raises(ValueError, match="max_lm_calls_per_user"):
        tune(Synthetic(), storage=url, study_name="fixed", n_trials=2, max_lm_calls_per_user=20, context={"task": "A"})
    with pytest.raises(ValueError, match="context"):
        tune(Synthetic(), storage=url, study_name="fixed", n_trials=2, max_lm_calls_per_user=10, context={"task": "B"})
    with pytest.raises(ValueError, match="space"):
        tune(Synthetic(), storage=url, study_name="fixed", n_trials=2, max_lm_calls_per_user=10,
             context={"task": "A"}, space=AlignerSearchSpace(k=(1, 3)))
    with pytest.raises(ValueError, match="optimizes"):
        tune(Synthetic(), storage=url, study_name="fixed", n_trials=2, max_lm_calls_per_user=10,
             context={"task": "A"}, multi_objective=True)


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2"])
def test_multi_objective_returns_a_pareto_front(tmp_path, algorithm):
    study = tune(Synthetic(), storage=sqlite(tmp_path), study_name="pareto", n_trials=14, multi_objective=True,
                 algorithm=algorithm, seed=2)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = completed_trials(study)
    assert len(trials) == 14 and all(t.values == [t.user_attrs["score"], t.user_attrs["lm_calls_per_user"]]
                                     for t in trials)
    front = pareto_front(study)
    assert front and {t.number for t in front} == {t.number for t in study.best_trials}  # Optuna's own front

    def dominates(a, b) -> bool:
        return a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values != b.values

    assert not any(dominates(a, b) for a in front for b in front)
    assert all(any(dominates(f, t) for f in front) for t in trials if t not in front)

    assert best_settings(study) == max(front, key=lambda t: t.values[0]).params  # no budget: the top score
    budget = sorted(t.values[1] for t in front)[len(front) // 2]
    chosen = best_trial(study, max_lm_calls_per_user=budget)
    assert chosen in front and chosen.values[1] <= budget
    assert chosen.values[0] == max(t.values[0] for t in trials if t.values[1] <= budget)


def test_a_budget_also_constrains_the_multi_objective_sampler(tmp_path):
    study = tune(Synthetic(), storage=sqlite(tmp_path), study_name="both", n_trials=8, multi_objective=True,
                 max_lm_calls_per_user=20, seed=4)
    trials = completed_trials(study)
    assert all(t.constraints == {"lm_calls_per_user": t.values[1] - 20} for t in trials)
    assert any(t.values[1] > 20 for t in trials)
    assert all(t.values[1] <= 20 for t in study.best_trials)  # Optuna's front keeps feasible trials only
    assert synthetic_calls(best_settings(study)) <= 20  # the stored budget applies


# -- the aligner objective, end to end (offline stand-in) ----------------------------------------------------------


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3", 3)


def test_aligner_objective_scores_and_counts_every_call(lamp3):
    histories, memory = lamp3
    temperatures: list[float] = []

    def lm_factory(temperature: float) -> dspy.LM:
        temperatures.append(temperature)
        return offline_lm(temperature=temperature)

    objective = aligner_objective(histories, memory=memory, lm_factory=lm_factory, workers=2)
    settings = {"batch_size": 2, "iterations": 2, "k": 3, "temperature": 0.4}
    outcome = objective(dict(settings))
    assert temperatures == [0.0, 0.4]  # the initial personas at temperature 0, then the trial's task LM

    # the same work done by hand: alignment from the initial persona + one call per test query, pooled over users
    with dspy.context(lm=offline_lm(temperature=0.0)):
        personas = {history.user_id: initial_persona(history) for history in histories}
    usage, rows = LMUsage(), []
    with dspy.context(lm=offline_lm(temperature=0.4), callbacks=[usage]):
        for history in histories:
            start = initial_agent(history, memory, k=3, persona=personas[history.user_id])
            agent = align_user(history, memory, k=3, start=start, batch_size=2, iterations=2)
            for example in query_examples(history):
                rows.append((history.user_id, agent(**example.inputs()).answer, example.answer))
    mae = aggregate_by_user("LaMP_3", rows)["overall"]["mae"]

    assert outcome.lm_calls_per_user == usage.calls / len(histories) > 0
    assert outcome.score == pytest.approx(-mae)  # MAE is lower-is-better: the score is its negation
    assert outcome.details["metric"] == "mae" and outcome.details["metric_value"] == pytest.approx(mae)
    assert outcome.details["n_users"] == 3 and outcome.details["offline"] is True
    assert outcome.details["initial_persona_usage"]["calls"] == len(histories)  # reported apart, not per user

    cheaper = objective({"batch_size": 1, "iterations": 1, "k": 3, "temperature": 0.0})
    assert cheaper.lm_calls_per_user < outcome.lm_calls_per_user


class CountingSummaries(OfflineEngine):
    """The stand-in, counting PersonaSummary requests (the initial persona)."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries = 0

    def complete(self, request):
        if "Summarize this user's history into a persona" in str(request.system):
            with self._lock:
                self.summaries += 1
        return super().complete(request)


def test_initial_personas_are_summarised_once_for_all_trials(lamp3, tmp_path):
    histories, memory = lamp3
    engine = CountingSummaries()

    def lm_factory(temperature: float) -> dspy.LM:
        return dspy.LM("offline/counting", engine=engine, temperature=temperature, cache=False, num_retries=0)

    objective = aligner_objective(histories[:2], memory=memory, lm_factory=lm_factory, workers=2)
    study = tune(objective, storage=sqlite(tmp_path), study_name="once", n_trials=3,
                 space=AlignerSearchSpace(batch_size=(1, 3)))
    assert len(completed_trials(study)) == 3
    assert engine.summaries == 2  # one per user, not one per user and trial
    assert all(t.user_attrs["details"]["initial_persona_usage"]["calls"] == 2 for t in study.trials)


def test_batch_size_is_searched_up_to_n_recent_only(lamp3, tmp_path):
    histories, memory = lamp3
    assert aligner_space(3).batch_size == (1, 3) and aligner_space(2, k=(2, 4)).k == (2, 4)
    with pytest.raises(ValueError, match=r"batch_size bounds \(1, 5\) reach above n_recent=3"):
        aligner_space(3, batch_size=(1, 5))
    common = dict(lm=lm_config("offline"), storage=sqlite(tmp_path), study_name="batch", workers=2)
    with pytest.raises(ValueError, match="n_recent=2"):
        run_tuning("LaMP_3", histories[:1], memory, n_trials=1, n_recent=2, space=AlignerSearchSpace(), **common)
    run_tuning("LaMP_3", histories[:1], memory, n_trials=2, n_recent=2, **common)
    study = optuna.load_study(study_name="batch", storage=common["storage"])
    assert study.user_attrs["tuning"]["space"]["batch_size"] == [1, 2]
    assert all(t.params["batch_size"] <= 2 for t in study.trials)


def test_a_user_failure_fails_the_trial(lamp3, tmp_path, monkeypatch):
    histories, memory = lamp3

    def broken(history, *args, **kwargs):
        raise TimeoutError(f"no answer for {history.user_id}")

    monkeypatch.setattr(tuning_job, "align_user", broken)
    objective = aligner_objective(histories, memory=memory, lm_factory=lambda t: offline_lm(temperature=t))
    study = tune(objective, storage=sqlite(tmp_path), study_name="broken", n_trials=2, max_failed_trials=1)
    assert states(study) == [TrialState.FAIL]
    assert "TimeoutError: no answer for" in study.trials[0].user_attrs["error"]


def test_run_tuning_offline_resumes_and_summarises(lamp3, tmp_path):
    histories, memory = lamp3
    common = dict(lm=lm_config("offline"), storage=sqlite(tmp_path), study_name="lamp3", workers=3)
    summary = run_tuning("LaMP_3", histories, memory, n_trials=3, max_lm_calls_per_user=30, **common)
    assert summary["trials_done"] == 3 and summary["trials_failed"] == 0 and summary["mode"] == "single_objective"
    assert summary["offline"] is True and summary["note"] and summary["metric"] == "mae"
    assert set(summary["best_settings"]) == {"batch_size", "iterations", "k", "temperature"}
    assert summary["lm_calls_per_user"] <= 30
    assert summary["best_score"] == pytest.approx(-summary["best_metric_value"])
    assert all(row["settings"]["batch_size"] <= 3 for row in summary["trials"])  # the default n_recent

    again = run_tuning("LaMP_3", histories, memory, n_trials=4, max_lm_calls_per_user=30, **common)
    assert again["trials_done"] == 4
    study = optuna.load_study(study_name="lamp3", storage=common["storage"])
    assert len(study.trials) == 4
    assert all({"score", "lm_calls_per_user", "details"} <= set(t.user_attrs) for t in study.trials)
    assert [row["number"] for row in again["trials"]] == [0, 1, 2, 3]
    assert all(row["feasible"] is (row["lm_calls_per_user"] <= 30) for row in again["trials"])

    with pytest.raises(ValueError, match="context"):  # other users: scores would not be comparable
        run_tuning("LaMP_3", histories[:2], memory, n_trials=5, max_lm_calls_per_user=30, **common)


def test_run_tuning_multi_objective_reports_the_front(lamp3, tmp_path):
    histories, memory = lamp3
    summary = run_tuning("LaMP_3", histories[:2], memory, lm=lm_config("offline"),
                         storage=sqlite(tmp_path), study_name="front", n_trials=4, multi_objective=True, workers=2)
    assert summary["mode"] == "multi_objective" and summary["trials_done"] == 4
    front = summary["pareto_front"]
    assert front and summary["best_trial"] in {row["number"] for row in front}
    assert [row["lm_calls_per_user"] for row in front] == sorted(row["lm_calls_per_user"] for row in front)
