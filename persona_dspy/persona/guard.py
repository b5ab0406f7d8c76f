"""Keeping every persona safe: its role and rules are fixed, its length is capped, history stays data.

Optimizers and LMs rewrite personas after reading a user's untrusted history, and a guard must not depend on the LM
obeying. So a persona is always rebuilt as ``template.compose(summary)``: role and rules come from the
``PersonaTemplate``, only the user summary from text, and from the summary injection lines and rules or
instructions blocks are dropped and the word cap applied. ``PersonaGuard.check`` says whether it had to intervene.
Guarding is a property of the program: ``guard_program(program)`` guards the instructions in force in any program
that knows its persona predictors (PersonaAgent also does it before every answer).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

from persona_dspy.outputs.validation import record, rejection
from persona_dspy.signatures.persona import (
    DEFAULT_TEMPLATE,
    EMPTY_SUMMARY,
    PLAIN_TEMPLATE,
    USER_SUMMARY_HEADER,
    PersonaTemplate,
)

logger = logging.getLogger(__name__)

_INJECTION = re.compile(
    r"(ignore|disregard|forget|override|bypass)\b.{0,40}\b(rules?|instructions?|prompts?|persona|guidelines?)"
    r"|\byou (are|must) now\b|\bsystem prompt\b|\bnew instructions?\b|\bdelete\b.{0,30}\brules?\b"
    r"|\bfrom now on\b|\bprevious (instructions?|rules?|prompts?)\b"
    r"|\b(always|only|must)\s+(answer|respond|reply|output|say|rate|choose|pick|select|return|give)\b"
    r"|^\W*you\s+(are|will|must|shall|should)\b|\b(act|pretend|role-?play)\s+(as|to be|like)\b",
    re.IGNORECASE,
)
_RULES_HEADER = re.compile(
    r"^\W*(rules?|instructions?|system(\s+prompt)?|guidelines?|constraints?|directives?|commands?|orders?)\s*:",
    re.IGNORECASE,
)
_SECTION_HEADER = re.compile(r"^\W*[A-Za-z][\w ]{0,30}:\s*$")
_BULLET = re.compile(r"^\s*[-*\u2022]\s+(?P<text>\S.*)$")
_IMPERATIVE = re.compile(
    r"^(always|never|do|don'?t|must|should|answer|respond|reply|output|give|say|write|use|ignore|follow|only|"
    r"rate|choose|pick|select|return|avoid|treat|think|look|be|keep|delete|remove|forget|obey)\b",
    re.IGNORECASE,
)


def is_injection(line: str) -> bool:
    """Whether a line reads as an instruction aimed at the assistant (the guard drops it from any summary)."""
    return _INJECTION.search(line) is not None


def describes_user(line: str) -> bool:
    """Whether a line under a rules header is about the user after all: a bullet, and not an order.

    Some models append new preference bullets after the rules, so those are kept; numbered lines, plain sentences
    and imperative bullets ("- Always answer 1") are rules, and rules are fixed.
    """
    bullet = _BULLET.match(line)
    return bullet is not None and not _IMPERATIVE.match(bullet.group("text"))


def word_count(text: str) -> int:
    return len(text.split())


def cap_words(text: str, max_words: int) -> str:
    """At most ``max_words`` words, cut at whole lines where possible."""
    if word_count(text) <= max_words:
        return text
    kept: list[str] = []
    used = 0
    for line in text.splitlines():
        n = word_count(line)
        if used + n > max_words:
            if not kept:  # one very long line: cut inside it
                kept.append(" ".join(line.split()[:max_words]))
            break
        kept.append(line)
        used += n
    return "\n".join(kept).strip()


def template_for(persona: str) -> PersonaTemplate:
    """The template of a program's starting persona: the default one when it fits it exactly, else the program's own.

    A program the project did not write carries its developer's instructions (ReAct's "You are an Agent...", their
    own rules): those are trusted and become the fixed role, and what alignment learns goes in a user summary after
    them. A summary an earlier alignment wrote is split off at the first summary header, which the template itself
    put there: any later one belongs to the summary.
    """
    if fits(DEFAULT_TEMPLATE, persona):
        return DEFAULT_TEMPLATE
    role = persona.partition(f"\n\n{USER_SUMMARY_HEADER}\n")[0].strip()
    return PersonaTemplate(role=role or None, rules=()) if role else PLAIN_TEMPLATE


def is_fixed_part(template: PersonaTemplate, text: str) -> bool:
    """Whether ``text`` is exactly the fixed role of ``template``, with no summary (a program's own instructions)."""
    return template.role is not None and not template.rules and text.strip() == template.role


def fits(template: PersonaTemplate, text: str) -> bool:
    """Whether ``text`` is ``template.compose(summary)`` for some summary (fixed parts in place, verbatim)."""
    body = text.strip()
    head, tail = template.head, template.tail
    return (template.has_fixed_parts and body.startswith(head) and body.endswith(tail)
            and len(body) >= len(head) + len(tail))


@dataclass(frozen=True)
class GuardResult:
    """A guarded persona, and what the guard changed to get it (empty ``dropped`` and no flags: it let it be)."""

    text: str
    summary: str
    dropped: tuple[str, ...] = ()
    restored_fixed_parts: bool = False
    capped: bool = False
    used_fallback: bool = False

    @property
    def intervened(self) -> bool:
        return bool(self.dropped) or self.restored_fixed_parts or self.capped or self.used_fallback


@dataclass(frozen=True)
class PersonaGuard:
    """Rebuilds any proposed persona as ``template.compose(clean summary)`` within ``max_words`` (module docstring).

    The summary keeps at least ``min_summary_words``, so the cap holds only when ``max_words >= min_words()``.
    """

    max_words: int = 300
    min_summary_words: int = 20
    template: PersonaTemplate = field(default=DEFAULT_TEMPLATE)

    def min_words(self) -> int:
        """The smallest cap this guard can honour: the template's role and rules plus the minimal summary."""
        return self.fixed_words() + self.min_summary_words

    def fixed_words(self) -> int:
        return word_count(self.template.compose(""))

    def summary_budget(self) -> int:
        """Words left for the summary under the cap."""
        return max(self.min_summary_words, self.max_words - self.fixed_words())

    def split(self, text: str) -> tuple[str, bool]:
        """(the summary part of ``text``, whether its fixed parts were missing or changed), by position only."""
        body = text.strip()
        if not self.template.has_fixed_parts:
            return body, False
        if is_fixed_part(self.template, body):
            return "", False
        if fits(self.template, body):
            return body[len(self.template.head):len(body) - len(self.template.tail)], False
        return body, True  # a rewrite that moved or changed the fixed parts: all of it is summary (cleaned below)

    def clean(self, summary: str) -> tuple[str, tuple[str, ...], bool]:
        """(the summary without fixed lines, rules and injections, capped; the lines dropped; whether it was cut)."""
        fixed = self.template.fixed_lines()
        kept: list[str] = []
        dropped: list[str] = []
        in_rules = False
        for line in summary.splitlines():
            stripped = line.strip()
            if not stripped:
                kept.append("")
                continue
            if _RULES_HEADER.match(stripped):  # "Rules:" (with a rule on its line or under it): never from a summary
                in_rules = True
                dropped.append(stripped)
                continue
            if stripped in fixed or stripped == USER_SUMMARY_HEADER:
                continue  # the template puts the fixed parts back where they belong
            if _SECTION_HEADER.match(stripped):
                in_rules = False
            if (in_rules and not describes_user(line)) or is_injection(stripped):
                dropped.append(stripped)
                continue
            kept.append(line.rstrip())
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        capped = cap_words(text, self.summary_budget())
        return capped, tuple(dropped), capped != text

    def check(self, proposed: str, *, fallback: str | None = None, summary_only: bool = False) -> GuardResult:
        """Guard a proposed persona (or, with ``summary_only``, a proposed summary); what it did is in the result.

        ``fallback`` is the summary kept when nothing usable is left (default: ``EMPTY_SUMMARY``).
        """
        if not summary_only and is_fixed_part(self.template, proposed):
            return GuardResult(self.template.role or "", "")  # a program's own instructions, before any summary
        raw, restored = (proposed.strip(), False) if summary_only else self.split(proposed)
        summary, dropped, capped = self.clean(raw)
        used_fallback = not summary
        if used_fallback:
            summary = self.clean(fallback)[0] if fallback else ""
            summary = summary or cap_words(EMPTY_SUMMARY, self.summary_budget())
        return GuardResult(self.template.compose(summary), summary, dropped, restored, capped, used_fallback)

    def apply(self, proposed: str, *, fallback: str | None = None) -> str:
        """The guarded persona for a proposed persona text."""
        return self.check(proposed, fallback=fallback).text

    def compose(self, summary: str) -> str:
        """The guarded persona for a user summary (the initial persona: an LM's summary of untrusted history)."""
        return self.check(summary, summary_only=True).text

    def summary(self, persona: str) -> str:
        """The clean summary of a persona text (what an update may revise)."""
        return self.check(persona).summary


@dataclass
class PredictorGuards:
    """A program's persona predictors by name, each with its guard, and the instructions each last had guarded.

    Optimizers attach one to the programs they return (``program.persona_guarding``), so that ``guard_program``
    can guard what a later optimizer, ``load_state`` or an assignment wrote there. Nothing usable left in a
    rewrite keeps the summary last guarded (a cut-off instruction does not erase what was learned of the user).
    """

    guards: dict[str, PersonaGuard]
    guarded: dict[str, str] = field(default_factory=dict)

    def apply(self, program: Any) -> list[str]:
        """Guard the instructions in force; the names of the predictors whose instructions changed."""
        predictors = dict(program.named_predictors())
        missing = sorted(set(self.guards) - set(predictors))
        if missing:
            raise ValueError(f"the program has no predictor(s) {missing} to guard; it has {sorted(predictors)}")
        changed = []
        for name, guard in self.guards.items():
            predictor = predictors[name]
            text = predictor.signature.instructions
            if text == self.guarded.get(name):
                continue
            previous = self.guarded.get(name)
            result = guard.check(text, fallback=guard.summary(previous) if previous else None)
            if result.text != text:
                predictor.signature = predictor.signature.with_instructions(result.text)
                changed.append(name)
            self.guarded[name] = result.text
        return changed

    def to_json(self) -> dict[str, Any]:
        """The guards as JSON (program files): each predictor's template and caps."""
        return {name: {"role": g.template.role, "rules": list(g.template.rules), "max_words": g.max_words,
                       "min_summary_words": g.min_summary_words} for name, g in self.guards.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PredictorGuards:
        """The guards ``to_json`` wrote; ValueError naming the entry that is not one."""
        guards = {}
        for name, entry in data.items():
            try:
                role, rules = entry["role"], entry["rules"]
                if not (role is None or isinstance(role, str)) or not all(isinstance(r, str) for r in rules):
                    raise TypeError("role must be a text or null, rules a list of texts")
                guards[name] = PersonaGuard(max_words=int(entry["max_words"]),
                                            min_summary_words=int(entry["min_summary_words"]),
                                            template=PersonaTemplate(role=role, rules=tuple(rules)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"the guard of predictor {name!r} is unusable: {type(exc).__name__}: {exc}") from exc
        return cls(guards)


def guard_program(program: Any) -> list[str]:
    """Guard the persona instructions in force in ``program`` and its sub-modules; the predictors it changed.

    A module with a ``guard_persona()`` method (PersonaAgent) guards itself; one carrying ``persona_guarding``
    (``PredictorGuards``: what PersonaAligner and ``persona_gepa`` attach) is guarded by it. Run it after any
    optimizer that writes instructions directly (COPRO, MIPROv2, SIMBA) and after loading a state; a program with
    neither has no known persona and is left as it is (an empty list).
    """
    changed: list[str] = []
    for path, module in program.named_sub_modules():
        prefix = "" if path == "self" else path.removeprefix("self.") + "."
        own = getattr(module, "guard_persona", None)
        if callable(own):
            changed += [prefix + name for name in own()]
            continue
        guarding = getattr(module, "persona_guarding", None)
        if isinstance(guarding, PredictorGuards):
            changed += [prefix + name for name in guarding.apply(module)]
    return changed


class GuardedInstructionProposer(InstructionProposer):
    """GEPA's default instruction proposer, with every proposed instruction passed through a PersonaGuard.

    ``guard`` is one guard for every component, or one per component (``PersonaPredictors.guards``: each predictor
    keeps its own fixed part). ``components`` limits it to the named predictors (default: the guards' names, or all
    that GEPA updates): GEPA is asked for no proposal for any other predictor, so those keep their instructions.
    ``interventions`` counts the proposals the guard had to change. A proposal with nothing usable left after the
    guard, or whose summary fails validation (a placeholder, an echo of the prompt), is counted invalid (step
    ``update``) and the component keeps its current instruction. Pass ``component_selector()`` to GEPA too, so
    that its reflection turns never pick a predictor that does not carry the persona.
    """

    def __init__(self, guard: PersonaGuard | Mapping[str, PersonaGuard], components: Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guards = dict(guard) if isinstance(guard, Mapping) else None
        self.guard = guard if isinstance(guard, PersonaGuard) else None
        names = components if components is not None else (list(self.guards) if self.guards is not None else None)
        self.components = list(names) if names is not None else None
        self.interventions = 0
        self.proposals = 0

    def guard_of(self, name: str) -> PersonaGuard:
        if self.guards is not None:
            return self.guards[name]
        assert self.guard is not None
        return self.guard

    def __call__(self, candidate: dict[str, str], reflective_dataset: Mapping[str, Sequence[Mapping[str, Any]]],
                 components_to_update: list[str]) -> dict[str, str]:
        names = [n for n in components_to_update if self.components is None or n in self.components]
        if not names:
            logger.warning("GEPA asked to update %s, none of which carries the persona: no proposal",
                           components_to_update)
            return {}
        proposed = super().__call__(candidate, reflective_dataset, names)
        guarded: dict[str, str] = {}
        for name, text in proposed.items():
            guard = self.guard_of(name)
            result = guard.check(text, fallback=guard.summary(candidate.get(name, "")))
            self.proposals += 1
            if result.intervened:
                self.interventions += 1
                logger.info("guard changed GEPA's proposal for %s (dropped %d lines)", name, len(result.dropped))
            invalid = "empty after the guard" if result.used_fallback else rejection(result.summary)
            record("update", checked=1, invalid=invalid)
            if invalid is not None and name in candidate:  # a placeholder or an echo: the instruction stays
                logger.warning("GEPA's proposal for %s rejected (%s): kept the current instruction", name, invalid)
                guarded[name] = candidate[name]
                continue
            guarded[name] = result.text
        return guarded

    def component_selector(self) -> PersonaComponentSelector:
        """GEPA's ``component_selector``: round robin over this proposer's components only."""
        if self.components is None:
            raise ValueError("no components named: every predictor may be updated, use GEPA's own selector")
        return PersonaComponentSelector(self.components)


class PersonaComponentSelector:
    """A GEPA ``ReflectionComponentSelector`` that picks, in turn, only the predictors that carry the persona."""

    def __init__(self, components: Sequence[str]) -> None:
        if not components:
            raise ValueError("no persona components to select from")
        self.components = list(components)
        self._next: dict[int, int] = {}

    def __call__(self, state: Any, trajectories: Any, subsample_scores: Any, candidate_idx: int,
                 candidate: dict[str, str]) -> list[str]:
        names = [n for n in self.components if n in candidate]
        if not names:
            raise ValueError(f"none of the persona components {self.components} is in GEPA's candidate "
                             f"{sorted(candidate)}")
        turn = self._next.get(candidate_idx, 0)
        self._next[candidate_idx] = turn + 1
        return [names[turn % len(names)]]
