"""Aligning one user end to end: initial persona from semantic memory, then PersonaAligner on recent interactions.

The many-user compile, the optimizer comparison and the tuning objective all align users this way, and check the
result the same way (``persona_problem``) before anything keeps it.
"""

from __future__ import annotations

from typing import Any

import dspy

from persona_dspy.agent.persona_agent import DEFAULT_MODE, AgentMode, PersonaAgent
from persona_dspy.agent.semantic_memory import initial_agent
from persona_dspy.data.examples import interaction_examples
from persona_dspy.data.records import UserDataError, UserHistory
from persona_dspy.evaluation.metrics import dspy_metric
from persona_dspy.memory.episodic import EpisodicMemory
from persona_dspy.memory.retrieval import searches_reused
from persona_dspy.optimizers.persona_aligner import PersonaAligner
from persona_dspy.outputs.validation import rejection
from persona_dspy.signatures.persona import EMPTY_SUMMARY

DEFAULT_RECENT = 3


def split_recent(examples: list[dspy.Example]) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """(feedback set, held-back set): the newest half of the recent interactions is held back to judge a rewrite,
    so a persona is adopted only when it answers items it was not rewritten from better. One item is both."""
    if len(examples) < 2:
        return examples, examples
    held = (len(examples) + 1) // 2
    return examples[:-held], examples[-held:]


def align_user(history: UserHistory, memory: EpisodicMemory, *, mode: AgentMode = DEFAULT_MODE, k: int = 5,
               n_recent: int = DEFAULT_RECENT, optimizer_lm: dspy.LM | None = None,
               start: PersonaAgent | None = None, **aligner_settings: Any) -> PersonaAgent:
    """Align one user's persona on their ``n_recent`` latest interactions (``split_recent``: the older half gives the
    feedback, the newer half judges each rewrite); ``start`` warm-starts from a program."""
    recent = interaction_examples(history, n_recent)
    if not recent:
        raise UserDataError(history.user_id, "has no history before their first query to align on (an empty "
                            "profile)")
    trainset, valset = split_recent(recent)
    student = start if start is not None else initial_agent(history, memory, mode=mode, k=k)
    aligner = PersonaAligner(dspy_metric(history.task), optimizer_lm=optimizer_lm, **aligner_settings)
    with searches_reused():  # every iteration answers the same interactions: each is retrieved once, up front
        student.retrieve_ahead(example.inputs() for example in recent)
        return aligner.compile(student, trainset=trainset, valset=valset)


def persona_problem(aligned: PersonaAgent, outputs: dict[str, Any], *, warm_start: bool = False) -> str | None:
    """Why an aligned program must not be kept (None: it may): its persona failed validation, or it knows nothing
    of the user (the LM's summary was rejected, no answers to state instead, no update improved on it), or the
    scores it was chosen on were all computed on invalid answers.

    ``outputs`` is the user's ``OutputStats.snapshot()``; ``warm_start``: the persona came from a saved program.
    """
    summary = aligned.persona_summary
    reason = rejection(summary, instructions=aligned.persona_guard.template.compose(""))
    if reason is not None:
        return f"the persona failed validation ({reason})"
    report = getattr(aligned, "alignment", {}) or {}
    invalid = outputs.get("invalid") or {}
    nothing_known = summary.strip() in ("", EMPTY_SUMMARY)  # no LM summary and no answers to state instead
    if invalid.get("summary") and nothing_known and not warm_start and not report.get("improved"):
        first = next((r for r in outputs.get("reasons", []) if r.startswith("summary")), "summary: rejected")
        return (f"the persona summary was rejected ({first.partition(': ')[2]}) and no valid update improved on "
                "it, so the persona holds nothing learned about this user")
    answers = int(report.get("answers") or 0)
    bad = int((report.get("invalid") or {}).get("answer") or 0)
    if answers and bad == answers:
        return f"all {answers} answers it was scored on were invalid, so its scores mean nothing"
    return None
