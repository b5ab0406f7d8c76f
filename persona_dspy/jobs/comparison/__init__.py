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
  GEPA only logs a metric that raises while it reflects and returns the program unchanged; here a failing
  feedback metric stops GEPA (``MetricError``) and that user is recorded as GEPA's failure.
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

Every persona an optimizer proposes passes ``PersonaGuard``: the aligner guards its candidates, GEPA proposes through
``GuardedInstructionProposer`` (its instruction-proposer hook), and every compiled program's persona is guarded after
compile (MIPROv2, COPRO, ...); ``guard_interventions`` in the report counts the personas the guard had to change.

Scores measured with the offline stand-in LM are plumbing checks, never a model's score; reports say so.
"""

from persona_dspy.jobs.comparison.contenders import DEFAULT_OPTIMIZERS, OptimizerSpec, default_specs
from persona_dspy.jobs.comparison.harness import compare_optimizers
from persona_dspy.jobs.comparison.report import ComparisonReport, OptimizerResult, UserRun, plot_score_vs_calls

__all__ = ["DEFAULT_OPTIMIZERS", "ComparisonReport", "OptimizerResult", "OptimizerSpec", "UserRun",
           "compare_optimizers", "default_specs", "plot_score_vs_calls"]
