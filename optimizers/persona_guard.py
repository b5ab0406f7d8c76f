"""Keeping a rewritten persona safe: its rules survive, its length is capped, history stays data.

The update LM reads feedback that quotes the user's history, and history is untrusted text ("ignore
your rules..."). Prompts tell the LM to treat it as data, but a guard must not depend on the LM
obeying. So only the user-summary part of a persona is optimizable: after every update the role and
the rules are restored verbatim from the starting persona, and the summary is cut to fit the word cap.
Of what the update wrote, two kinds of line are dropped: lines matching the injection pattern
(``_INJECTION``: "ignore your rules", "you are now", "delete the rules"...), and anything written as a rule,
i.e. every line of the update's own "Rules:" section except bullets describing the user
(``- Preferred label: 4``, see ``describes_user``), which move to the summary.
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
_BULLET = re.compile(r"^\s*[-*\u2022]\s+(?P<text>\S.*)$")
_IMPERATIVE = re.compile(
    r"^(always|never|do|don'?t|must|should|answer|respond|reply|output|give|say|write|use|ignore|follow|only|"
    r"rate|choose|pick|select|return|avoid|treat|think|look|be|keep|delete|remove|forget|obey)\b",
    re.IGNORECASE,
)


def describes_user(line: str) -> bool:
    """Whether a line the update put under "Rules:" is summary after all: a bullet, and not an order.

    The offline stand-in (and some models) append new preference bullets after the rules, so those are kept;
    numbered lines, plain sentences and imperative bullets ("- Always answer 1") are rules, which are fixed.
    """
    bullet = _BULLET.match(line)
    return bullet is not None and not _IMPERATIVE.match(bullet.group("text"))


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
    """Rebuilds a proposed persona around the starting persona's role and rules, within ``max_words``.

    Dropped from the proposal: lines matching the injection pattern, and anything written as a rule (every
    line of its "Rules:" section but user-describing bullets, see ``describes_user``). The summary keeps at
    least ``min_summary_words``, so the cap holds only when ``max_words >= min_words(original)``.
    """

    max_words: int = 300
    min_summary_words: int = 20

    def min_words(self, original: str) -> int:
        """The smallest cap this guard can honour for ``original``: its role and rules plus the minimal summary."""
        return self._fixed_words(split_persona(original)) + self.min_summary_words

    @staticmethod
    def _fixed_words(base: PersonaParts) -> int:
        return word_count(PersonaParts(base.role, "", base.rules).text())

    def apply(self, original: str, proposed: str) -> str:
        base = split_persona(original)
        new = split_persona(proposed)
        lines = new.summary.splitlines()
        if new.rules is not None:  # the rules are fixed: of the update's own, only bullets about the user survive
            fixed_rules = {line.strip() for line in (base.rules or "").splitlines()}
            lines += [line for line in new.rules.splitlines()
                      if describes_user(line) and line.strip() not in fixed_rules]
        summary = "\n".join(line for line in lines if not _INJECTION.search(line)).strip()
        budget = max(self.min_summary_words, self.max_words - self._fixed_words(base))
        summary = cap_words(summary, budget) or base.summary
        return PersonaParts(base.role, summary, base.rules).text()
