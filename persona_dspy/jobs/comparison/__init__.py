"""Comparing prompt optimizers on the same users: PersonaAligner against DSPy's own (GEPA, MIPROv2, COPRO, ...).

Every optimizer gets the same users, trainsets (the user's recent interactions), validation slice (the trainset),
starting program (PersonaAgent with the user's initial persona), metric, LMs and seeds, so differences come from the
optimizer alone. Each compiled program is scored on the user's held-out queries; LM calls are counted apart for
compile and evaluation, and every proposed persona passes the guard. How each DSPy optimizer is set up for a
3-example trainset, and why, is in docs/optimizers.md and beside each contender. Scores from the offline stand-in
are plumbing checks, never a model's score.
"""

from persona_dspy.jobs.comparison.contenders import DEFAULT_OPTIMIZERS, OptimizerSpec, default_specs
from persona_dspy.jobs.comparison.harness import compare_optimizers
from persona_dspy.jobs.comparison.report import ComparisonReport, OptimizerResult, UserRun, plot_score_vs_calls

__all__ = ["DEFAULT_OPTIMIZERS", "ComparisonReport", "OptimizerResult", "OptimizerSpec", "UserRun",
           "compare_optimizers", "default_specs", "plot_score_vs_calls"]
