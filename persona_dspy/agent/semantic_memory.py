"""Semantic memory: a user's persona, first summarised from their history.

The summary reads only the history every query may see (strictly before the user's earliest
query), so no query's gold answer can reach the persona. When the LM's summary is rejected twice (a weak model
echoes its prompt or its instructions), the summary states what the user's own answers show instead
(``history_profile``: their most frequent labels or ratings), counted as a summary fallback; only a history without
answers leaves the empty summary.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import dspy

from persona_dspy.agent.persona_agent import AgentMode, PersonaAgent
from persona_dspy.data.records import HistoryItem, UserHistory
from persona_dspy.lm.budget import context_window, fit_lines, reply_reserve
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.outputs.text import TextOutput, predict_text
from persona_dspy.outputs.validation import record
from persona_dspy.persona.guard import PersonaGuard
from persona_dspy.signatures import PersonaSummary

logger = logging.getLogger(__name__)


def render_history(items: Sequence[HistoryItem], max_items: int = 40, max_chars: int = 300) -> str:
    """The most recent ``max_items`` items as dated lines with the user's answer, oldest first."""
    lines = []
    for item in list(items)[-max_items:]:
        when = f"[{item.date.date().isoformat()}] " if item.date is not None else ""
        text = item.text if len(item.text) <= max_chars else item.text[:max_chars].rstrip() + "..."
        answer = f" -> {item.label}" if item.label is not None else ""
        lines.append(f"{when}{text}{answer}")
    return "\n".join(lines) if lines else "(no history)"


def history_profile(items: Sequence[HistoryItem], top: int = 3) -> str:
    """What a user's past answers say without any LM: their most frequent labels (or ratings), as a summary line.

    "" when the items carry no answers (LaMP-1 papers, LaMP-7 tweets).
    """
    labels = [str(item.label).strip() for item in items if item.label is not None and str(item.label).strip()]
    if not labels:
        return ""
    listed = ", ".join(f"{label} ({n} of {len(labels)})" for label, n in Counter(labels).most_common(top))
    try:
        mean = sum(float(label) for label in labels) / len(labels)
    except ValueError:  # category labels
        return f"- The labels they gave most often to their past items: {listed}."
    return f"- Their most frequent past ratings: {listed}; their average rating is {mean:.1f}."


class PersonaSummarizer(dspy.Module):
    """History -> persona text (role, user summary, rules): one LM call.

    The LM's summary of untrusted history passes ``guard`` like every later persona: only the summary comes from
    the LM, cleaned of injected instructions and rules; the role and rules come from the guard's template.
    """

    def __init__(self, max_items: int = 40, max_words: int = 120, guard: PersonaGuard | None = None) -> None:
        super().__init__()
        self.max_items = max_items
        self.max_words = max_words
        self.guard = guard or PersonaGuard()
        self.summarize = dspy.Predict(PersonaSummary)

    def forward(self, items: Sequence[HistoryItem]) -> dspy.Prediction:
        """``invalid`` says why the LM's summary was rejected (twice): the summary then states ``history_profile``
        (or, for a history without answers, the empty summary)."""
        history = render_history(items, self.max_items)
        lm = dspy.settings.lm
        window = context_window(lm) if lm is not None else None
        if window:  # the oldest items go first when the history does not fit the model's context
            lines, dropped = fit_lines(history.splitlines(), fixed_text=self.summarize.signature.instructions,
                                       window=window, reserve=reply_reserve(lm))
            if dropped:
                logger.info("persona summary: %d oldest history item(s) dropped to fit a %d-token context",
                            dropped, window)
                history = "\n".join(lines) or "(no history fits the model's context)"
        output = predict_text(self.summarize, "persona", step="summary", history=history, max_words=self.max_words)
        if output.fallback and not output.invalid:
            logger.warning("persona summary: %s", output.fallback)
        result = self.guard.check(output.text, summary_only=True)
        if output.invalid is None and result.used_fallback:  # all of it was rules, injections or template lines
            record("summary", invalid="empty after the guard")
            output = TextOutput("", output.fallback, "empty after the guard")
        if output.invalid:
            profile = history_profile(items)
            logger.warning("persona summary rejected: %s; the summary %s", output.invalid,
                           "states the user's most frequent answers instead" if profile else "starts empty")
            if profile:
                record("summary", fallback=True)
                output = TextOutput(profile, "the LM's summary was rejected: the user's most frequent answers instead",
                                    output.invalid)
                result = self.guard.check(profile, summary_only=True)
        if result.dropped:
            logger.warning("the initial summary carried %d line(s) that read as rules or instructions; dropped",
                           len(result.dropped))
        return dspy.Prediction(persona=result.text, summary=result.summary, raw_summary=output.text,
                               fallback=output.fallback, invalid=output.invalid)


def initial_persona(history: UserHistory, summarizer: PersonaSummarizer | None = None) -> str:
    """A user's starting persona, from the history strictly before their earliest query."""
    return (summarizer or PersonaSummarizer())(items=history.shared_history()).persona


def initial_agent(history: UserHistory, memory: EpisodicMemory, *, mode: AgentMode = "rag", k: int = 5,
                  persona: str | None = None) -> PersonaAgent:
    """The user's unoptimized agent: persona summarised from history before their earliest query (one LM call)."""
    if mode == "none":
        return PersonaAgent(history.task, None, "none", user_id=history.user_id, k=k)
    return PersonaAgent(history.task, memory, mode, persona=persona or initial_persona(history),
                        user_id=history.user_id, k=k)
