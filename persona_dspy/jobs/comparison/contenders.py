"""The contenders of a comparison: one small adapter per optimizer, all called the same way.

Each adapter turns ``CompileInputs`` (one user's private starting program, data and LMs) into a compiled program;
why each runs with its settings is in the package docstring.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy

from persona_dspy.data.records import UserHistory
from persona_dspy.optimizers.persona_aligner import PersonaAligner
from persona_dspy.optimizers.textual_loss import Metric, TextualLossMetric
from persona_dspy.persona.guard import GuardedInstructionProposer, PersonaGuard, template_for

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "initial", "non_personalized", "persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot",
)

GEPA_MAX_METRIC_CALLS = 30
COPRO_BREADTH = 3
COPRO_DEPTH = 2
BOOTSTRAP_METRIC_THRESHOLD = 1.0

Start = Literal["initial", "none"]


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


def student_guard(student: dspy.Module) -> PersonaGuard:
    """The guard of the starting program (PersonaAgent has its own), else one for its persona's template."""
    own = getattr(student, "persona_guard", None)
    if isinstance(own, PersonaGuard):
        return own
    predictors = student.predictors()
    return PersonaGuard(template=template_for(predictors[-1].signature.instructions if predictors else ""))


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
    """dspy.GEPA on the persona predictor, with the textual loss as feedback (budget: see docs/optimizers.md).

    ``auto`` uses GEPA's own budget presets instead of ``max_metric_calls`` (the benchmark measures "light").
    """
    budget: dict[str, Any] = {"auto": auto} if auto else {"max_metric_calls": max_metric_calls}
    settings = {"optimizer": "dspy.GEPA", "metric": "TextualLossMetric (feedback only when GEPA reads it)",
                "reflection_lm": "optimizer LM", "instruction_proposer": "GEPA's default, guarded", **budget,
                "reflection_minibatch_size": "min(3, len(trainset))", "candidate_selection_strategy": "pareto",
                "use_merge": True, "why_budget": "auto='light' is ~390 metric calls (~600 LM calls) per user with "
                "a 3-example valset; 30 = seed eval + ~3 reflective steps, the aligner's scale"}

    def run(inputs: CompileInputs) -> dspy.Module:
        feedback = TextualLossMetric(inputs.metric, lm=inputs.optimizer_lm)
        proposer = GuardedInstructionProposer(student_guard(inputs.student))
        optimizer = dspy.GEPA(metric=feedback, **budget,
                              reflection_minibatch_size=min(3, len(inputs.trainset)),
                              reflection_lm=inputs.optimizer_lm, instruction_proposer=proposer, seed=inputs.seed,
                              track_stats=True, gepa_kwargs={"stop_callbacks": [feedback.stop_on_failure()]})
        program = optimizer.compile(inputs.student, trainset=inputs.trainset, valset=inputs.valset)
        feedback.raise_failures()  # GEPA only logs a failing metric: the user's run is a failure, not a result
        program.comparison_details = {"guard_interventions": proposer.interventions,
                                      "guarded_proposals": proposer.proposals}
        result = getattr(program, "detailed_results", None)
        if result is not None:
            program.comparison_details.update({
                "candidates": len(result.candidates), "best_idx": result.best_idx,
                "val_aggregate_scores": [round(s, 4) for s in result.val_aggregate_scores],
                "total_metric_calls": result.total_metric_calls, "num_full_val_evals": result.num_full_val_evals})
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


