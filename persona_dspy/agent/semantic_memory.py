"""Semantic memory: a user's persona, first summarised from their history.

The summary reads only the history every query may see (strictly before the user's earliest query), so no query's
gold answer can reach the persona. It states the evidence first (``persona.evidence``: label or rating counts, typical
words, no LM), then the LM's preference lines that pass validation on their own; a summary with no LM line left is
counted as a summary fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dspy

from persona_dspy.agent.persona_agent import DEFAULT_MODE, AgentMode, PersonaAgent
from persona_dspy.data.records import HistoryItem, UserHistory
from persona_dspy.lm.budget import context_window, fit_lines, reply_reserve
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.outputs.text import predict_text
from persona_dspy.outputs.validation import record, rejection
from persona_dspy.persona.evidence import evidence_lines
from persona_dspy.persona.guard import PersonaGuard, is_injection
from persona_dspy.signatures import PersonaSummary

logger = logging.getLogger(__name__)


def render_history(items: Sequence[HistoryItem], max_items: int = 15, max_chars: int = 200) -> str:
    """The most recent ``max_items`` items as dated lines with the user's answer, oldest first."""
    lines = []
    for item in list(items)[-max_items:]:
        when = f"[{item.date.date().isoformat()}] " if item.date is not None else ""
        text = item.text if len(item.text) <= max_chars else item.text[:max_chars].rstrip() + "..."
        answer = f" -> {item.label}" if item.label is not None else ""
        lines.append(f"{when}{text}{answer}")
    return "\n".join(lines) if lines else "(no history)"


def preference_lines(text: str, history: Sequence[str], max_lines: int = 3) -> list[str]:
    """The lines of an LM's summary that state something of the user: each must pass validation on its own (no
    refusal, name, number, repetition or copied history), read as no instruction, and be new."""
    kept: list[str] = []
    for line in text.splitlines():
        body = line.strip().lstrip("-*\u2022 ").strip()
        if not body or is_injection(body) or rejection(body, copied_from=list(history)) is not None:
            continue
        if body.casefold() not in {k[2:].casefold() for k in kept}:
            kept.append(f"- {body}")
        if len(kept) == max_lines:
            break
    return kept


class PersonaSummarizer(dspy.Module):
    """History -> persona text (role, user summary, rules): evidence lines computed from the history, then the LM's
    preference lines that pass validation (one LM call, retried once when its whole reply is rejected).

    Only the summary comes from here, and it passes ``guard`` like every later persona: cleaned of injected
    instructions and rules; the role and rules come from the guard's template.
    """

    def __init__(self, max_items: int = 15, max_words: int = 80, guard: PersonaGuard | None = None,
                 max_item_chars: int = 200) -> None:
        super().__init__()
        self.max_items = max_items
        self.max_words = max_words
        self.max_item_chars = max_item_chars
        self.guard = guard or PersonaGuard()
        self.summarize = dspy.Predict(PersonaSummary)

    def forward(self, items: Sequence[HistoryItem]) -> dspy.Prediction:
        """``invalid`` says why the LM's reply was rejected (twice); ``lm_lines`` how many of its lines were kept."""
        evidence = evidence_lines(items)
        history = render_history(items, self.max_items, self.max_item_chars)
        lm = dspy.settings.lm
        window = context_window(lm) if lm is not None else None
        if window:  # the oldest items go first when the history does not fit the model's context
            lines, dropped = fit_lines(history.splitlines(), fixed_text=self.summarize.signature.instructions,
                                       window=window, reserve=reply_reserve(lm))
            if dropped:
                logger.info("persona summary: %d oldest history item(s) dropped to fit a %d-token context",
                            dropped, window)
                history = "\n".join(lines) or "(no history fits the model's context)"
        texts = [item.text for item in items]
        output = predict_text(self.summarize, "persona", step="summary", history=history, max_words=self.max_words,
                              copied_from=texts)
        if output.fallback and not output.invalid:
            logger.info("persona summary: %s", output.fallback)
        own = [] if output.invalid else preference_lines(output.text, texts)
        if not own:  # the summary states the evidence alone: counted, so a run shows how often the LM added nothing
            record("summary", fallback=True)
            logger.info("persona summary: no line of the LM's reply was kept (%s); the evidence alone",
                        output.invalid or "no line stated anything of the user")
        result = self.guard.check("\n".join([*evidence, *own]), summary_only=True)
        if result.dropped:
            logger.warning("the initial summary carried %d line(s) that read as rules or instructions; dropped",
                           len(result.dropped))
        return dspy.Prediction(persona=result.text, summary=result.summary, raw_summary=output.text,
                               fallback=output.fallback, invalid=output.invalid, lm_lines=len(own))


def initial_persona(history: UserHistory, summarizer: PersonaSummarizer | None = None) -> str:
    """A user's starting persona, from the history strictly before their earliest query."""
    return (summarizer or PersonaSummarizer())(items=history.shared_history()).persona


def initial_agent(history: UserHistory, memory: EpisodicMemory, *, mode: AgentMode = DEFAULT_MODE, k: int = 5,
                  persona: str | None = None, **options: Any) -> PersonaAgent:
    """The user's unoptimized agent: persona summarised from history before their earliest query (one LM call).
    ``options``: further ``PersonaAgent`` settings (``search_mode``, ``demo_chars``...)."""
    if mode == "none":
        return PersonaAgent(history.task, None, "none", user_id=history.user_id, k=k)
    return PersonaAgent(history.task, memory, mode, persona=persona or initial_persona(history),
                        user_id=history.user_id, k=k, **options)
