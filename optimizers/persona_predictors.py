"""Which predictors of a program carry the persona, and how to read and rewrite only those.

A program may have predictors that carry the user's persona (an answering step) and others that must never be
touched (a query rewrite, ReAct's tool loop). The choice is a list of names, a predicate, or by default those whose
instructions contain the starting persona (an explicit ``persona`` no predictor contains raises ValueError; with no
starting persona, all, with a warning). Each chosen predictor keeps its own fixed part; the one user summary
alignment learns is written after each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import dspy
from persona_dspy.signatures.persona import PersonaTemplate

from persona_dspy.persona.guard import PersonaGuard, template_for

logger = logging.getLogger(__name__)

PredictorChoice = Sequence[str] | Callable[[str, dspy.Predict], bool] | None


def starting_persona(program: dspy.Module) -> str | None:
    """The program's own ``persona`` text (PersonaAgent and programs like it), else None."""
    persona = getattr(program, "persona", None)
    return persona if isinstance(persona, str) and persona.strip() else None


def describe_choice(choice: PredictorChoice) -> str | list[str]:
    """The choice in a JSON-safe form, for settings and reports."""
    if choice is None:
        return "predictors whose instructions contain the starting persona"
    if callable(choice):
        return f"predicate {getattr(choice, '__qualname__', type(choice).__name__)}"
    return list(choice)


def persona_predictors(program: dspy.Module, choice: PredictorChoice = None,
                       persona: str | None = None) -> list[tuple[str, dspy.Predict]]:
    """The (name, predictor) pairs that carry the persona, by ``choice`` (module docstring)."""
    named = list(program.named_predictors())
    if not named:
        raise ValueError("the program has no predictors to carry a persona")
    if isinstance(choice, str):
        choice = [choice]
    if callable(choice):
        chosen = [(name, p) for name, p in named if choice(name, p)]
        if not chosen:
            raise ValueError(f"no predictor satisfies the persona predicate; the program has {[n for n, _ in named]}")
        return chosen
    if choice is not None:
        unknown = sorted(set(choice) - {name for name, _ in named})
        if unknown:
            raise ValueError(f"unknown predictor(s) {unknown}; the program has {[n for n, _ in named]}")
        return [(name, p) for name, p in named if name in set(choice)]
    if persona is not None and persona.strip():  # asked for by name: a typo must not widen to every predictor
        chosen = [(name, p) for name, p in named if persona.strip() in p.signature.instructions]
        if not chosen:
            raise ValueError(f"no predictor's instructions contain the persona {_excerpt(persona)}; searched the "
                             f"instructions of {[n for n, _ in named]}: pass the text as written in the program, "
                             "or name the predictors with persona_predictors=[...]")
        return chosen
    persona = starting_persona(program)
    if persona:
        chosen = [(name, p) for name, p in named if persona.strip() in p.signature.instructions]
        if chosen:
            return chosen
        reason = "no predictor's instructions contain the program's own persona"
    else:
        reason = "no starting persona was given"
    if len(named) > 1:
        logger.warning("%s: all %d predictors carry the persona (%s); pass the persona or choose the predictors "
                       "to leave the others untouched", reason, len(named), ", ".join(n for n, _ in named))
    return named


def _excerpt(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


class PersonaPredictors:
    """Read and write the persona of the chosen predictors, each behind its own fixed part.

    The persona the optimizer works on is the primary predictor's (the last chosen: the one nearest the answer);
    writing it writes its user summary after every chosen predictor's own fixed part. The summary budget is the
    primary's, so a predictor with long fixed instructions (ReAct's tool listing) still gets the whole summary.
    """

    def __init__(self, program: dspy.Module, choice: PredictorChoice = None, persona: str | None = None, *,
                 max_words: int = 300, template: PersonaTemplate | None = None) -> None:
        chosen = persona_predictors(program, choice, persona)
        self.names = [name for name, _ in chosen]
        primary = chosen[-1][1].signature.instructions
        self.guard = PersonaGuard(max_words=max_words, template=template or template_for(primary))
        budget = self.guard.summary_budget()
        self.guards: dict[str, PersonaGuard] = {}
        for name, predictor in chosen:
            own = template or template_for(predictor.signature.instructions)
            guard = PersonaGuard(max_words=max_words, template=own)
            self.guards[name] = PersonaGuard(max_words=max(max_words, guard.fixed_words() + budget), template=own)
        self.guards[self.names[-1]] = self.guard

    def _predictors(self, program: dspy.Module) -> dict[str, Any]:
        return {name: p for name, p in program.named_predictors() if name in self.guards}

    def get(self, program: dspy.Module) -> str:
        return self._predictors(program)[self.names[-1]].signature.instructions

    def set(self, program: dspy.Module, persona: str) -> None:
        summary = self.guard.check(persona).summary
        for name, predictor in self._predictors(program).items():
            guard = self.guards[name]
            text = guard.template.compose(summary) if summary else guard.check(guard.template.role or "").text
            predictor.signature = predictor.signature.with_instructions(text)

    def summaries(self, program: dspy.Module) -> dict[str, str]:
        """Each chosen predictor's current user summary (tests and reports)."""
        return {name: self.guards[name].summary(p.signature.instructions)
                for name, p in self._predictors(program).items()}
