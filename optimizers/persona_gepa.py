"""dspy.GEPA set up for a persona: textual-loss feedback, only persona predictors evolved, every proposal guarded.

Plain ``dspy.GEPA`` evolves every predictor (a query rewrite, ReAct's tool listing), keeps whatever the reflection
LM wrote, and swallows a failing metric. ``persona_gepa`` returns a ``dspy.GEPA`` that takes feedback from
``TextualLossMetric``, reflects only on the persona predictors, passes every proposal through ``PersonaGuard`` and
stops with ``MetricError`` once the metric fails. The program it returns carries ``persona_guarding``, so
``guard_program`` guards it after any later write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dspy
from persona_dspy.optimizers.persona_predictors import PersonaPredictors, PredictorChoice
from persona_dspy.optimizers.textual_loss import Metric, TextualLossMetric
from persona_dspy.signatures.persona import PersonaTemplate

from persona_dspy.persona.guard import GuardedInstructionProposer, PredictorGuards, guard_program

logger = logging.getLogger(__name__)


class PersonaGEPA(dspy.GEPA):
    """``dspy.GEPA`` whose result carries its persona predictors' guards and is guarded before it is returned."""

    persona_guards: dict[str, Any]

    def compile(self, student: dspy.Module, **kwargs: Any) -> dspy.Module:
        program = super().compile(student, **kwargs)
        program.persona_guarding = PredictorGuards(dict(self.persona_guards))
        guard_program(program)
        return program


def persona_gepa(program: dspy.Module, metric: Metric, *, reflection_lm: dspy.LM, persona: str | None = None,
                 persona_predictors: PredictorChoice = None, max_persona_words: int = 300,
                 template: PersonaTemplate | None = None, loss_lm: dspy.LM | None = None,
                 input_fields: Sequence[str] | None = None, output_fields: Sequence[str] | None = None,
                 **gepa_args: Any) -> PersonaGEPA:
    """A ``dspy.GEPA`` for ``program``'s persona (module docstring); ``gepa_args`` go to ``dspy.GEPA`` as they are.

    ``loss_lm`` writes the feedback (default: the reflection LM).
    """
    access = PersonaPredictors(program, persona_predictors, persona, max_words=max_persona_words, template=template)
    declared = {name for p in program.predictors() for name in p.signature.output_fields}
    loss = TextualLossMetric(metric, lm=loss_lm or reflection_lm, input_fields=input_fields,
                             output_fields=output_fields, declared_outputs=declared)
    proposer = GuardedInstructionProposer(access.guards)
    gepa_kwargs = dict(gepa_args.pop("gepa_kwargs", None) or {})
    stoppers = gepa_kwargs.get("stop_callbacks") or []
    stoppers = list(stoppers) if isinstance(stoppers, Sequence) else [stoppers]
    gepa_kwargs["stop_callbacks"] = [loss.stop_on_failure(), *stoppers]
    logger.info("GEPA evolves the persona of %s only", ", ".join(access.names))
    gepa = PersonaGEPA(metric=loss, reflection_lm=reflection_lm, instruction_proposer=proposer,
                       component_selector=proposer.component_selector(), gepa_kwargs=gepa_kwargs, **gepa_args)
    gepa.persona_proposer = proposer
    gepa.persona_guards = dict(access.guards)
    gepa.persona_loss = loss
    return gepa
