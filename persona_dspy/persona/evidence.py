"""What a user's history shows, stated without any LM: the evidence lines every persona summary starts with.

A small model's summary of a history is often junk (a product name, a date, a copied review); counts are not.
The lines state the user's labels or ratings with counts (and the average rating), and the words most typical of
their items, so a persona is grounded in the history even when no LM-written line survives validation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

TOP_LABELS = 5
TOP_WORDS = 6
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each even ever every few for from further get gets got had has have
having he her here hers him his how however i if in into is it its itself just like made make many may me more most
much must my never new no nor not now of off often on once one only or other our out over own really same she should
since so some still such than that the their them then there these they this those though through to too under until
up us use used using very was way we well were what when where which while who why will with would you your yours
one two three four five first last great good better best well time times thing things bought buy back also lot
really quite pretty said says say year years day days will know see look looks looking want need every much many
""".split())
"""Words that say nothing of a user's topics (function words, and review filler)."""


def _label_line(labels: list[str]) -> str:
    counts = Counter(labels).most_common(TOP_LABELS)
    listed = ", ".join(f"{label} {n}" for label, n in counts)
    return f"- Labels of their {len(labels)} past items, most used first: {listed}."


def _rating_line(ratings: list[float]) -> str:
    counts = Counter(int(r) if r.is_integer() else r for r in ratings)
    listed = ", ".join(f"{rating} stars {counts[rating]}" for rating in sorted(counts, reverse=True))
    mean = sum(ratings) / len(ratings)
    return f"- Ratings of their {len(ratings)} past reviews: {listed}; average {mean:.1f}."


def _topic_line(texts: Sequence[str]) -> str | None:
    """The words found in the most items (each item counts a word once), as a list of topics."""
    frequency: Counter[str] = Counter()
    for text in texts:
        words = [w for w in re.findall(r"[a-z][a-z'-]{3,}", text.casefold()) if w not in STOPWORDS]
        frequency.update(dict.fromkeys(words, 1))  # once per item, ties in order of first use
    common = [word for word, n in frequency.most_common(TOP_WORDS) if n >= 2]
    return f"- Words common in their items: {', '.join(common)}." if len(common) >= 3 else None


def evidence_lines(items: Sequence[Any]) -> list[str]:
    """The evidence about a user from their history ``items`` (objects with ``label`` and ``text``): their ratings
    with the average when every label is a number, else their labels; nothing is stated for an empty history."""
    labels = [str(item.label).strip() for item in items if item.label is not None and str(item.label).strip()]
    lines = []
    if labels:
        try:
            lines.append(_rating_line([float(label) for label in labels]))
        except ValueError:  # category labels
            lines.append(_label_line(labels))
    topics = _topic_line([str(item.text) for item in items])
    if topics:
        lines.append(topics)
    return lines
