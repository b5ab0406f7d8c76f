"""Keeping a rewritten persona safe: its rules survive, its length is capped, history stays data.

The update LM reads feedback that quotes the user's history, and history is untrusted text ("ignore
your rules..."). Prompts tell the LM to treat it as data, but a guard must not depend on the LM
obeying. So only the user-summary part of a persona is optimizable: after every update the role and
the rules are restored verbatim from the starting persona, lines addressed to the assistant
rather than describing the user are dropped, and the summary is cut to fit the word cap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from signatures.persona import PERSONA_RULES_HEADER, USER_SUMMARY_HEADER

_INJECTION = re.compile(
    r"(ignore|disregard|forget|override|bypass)\b.{0,40}\b(rules?|instructions?|prompt|persona|guidelines?)"
    r"|\byou (are|must) now\b|\bsystem prompt\b|\bnew instructions?\b|\bdelete\b.{0,30}\brules?\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PersonaParts:
    """A persona split into its role, user summary and rules (role/rules are None when absent)."""

    role: str | None
    summary: str
    rules: str | None

    def text(self) -> str:
        if self.role is None and self.rules is None:
            return self.summary
        parts = [self.role] if self.role else []
        parts.append(f"{USER_SUMMARY_HEADER}\n{self.summary}")
        if self.rules is not None:
            parts.append(f"{PERSONA_RULES_HEADER}\n{self.rules}")
        return "\n\n".join(parts)


def _header(text: str, header: str) -> re.Match[str] | None:
    return re.search(rf"(?im)^[ \t]*{re.escape(header)}[ \t]*$", text)


def split_persona(text: str) -> PersonaParts:
    """Find the 'User summary:' and 'Rules:' sections; text without them is all summary."""
    summary_head, rules_head = _header(text, USER_SUMMARY_HEADER), _header(text, PERSONA_RULES_HEADER)
    rules = None
    body = text
    if rules_head is not None:
        rules = text[rules_head.end():].strip()
        body = text[:rules_head.start()]
    if summary_head is not None and (rules_head is None or summary_head.start() < rules_head.start()):
        return PersonaParts(body[:summary_head.start()].strip() or None, body[summary_head.end():].strip(), rules)
    return PersonaParts(None, body.strip(), rules)


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


@dataclass(frozen=True)
class PersonaGuard:
    """Rebuilds a proposed persona around the starting persona's role and rules, within ``max_words``."""

    max_words: int = 300
    min_summary_words: int = 20

    def apply(self, original: str, proposed: str) -> str:
        base = split_persona(original)
        new = split_persona(proposed)
        lines = new.summary.splitlines()
        if new.rules is not None:  # the rules are fixed; anything the update added among them is summary
            fixed_rules = {line.strip() for line in (base.rules or "").splitlines()}
            lines += [line for line in new.rules.splitlines() if line.strip() and line.strip() not in fixed_rules]
        summary = "\n".join(line for line in lines if not _INJECTION.search(line)).strip()
        fixed = PersonaParts(base.role, "", base.rules).text()
        budget = max(self.min_summary_words, self.max_words - word_count(fixed))
        summary = cap_words(summary, budget) or base.summary
        return PersonaParts(base.role, summary, base.rules).text()
