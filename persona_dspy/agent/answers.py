"""Map what a (small, local) model actually says onto what LaMP's evaluator can score.

LaMP's evaluator is strict: a classification answer must equal a label exactly (``"Politics."`` or ``"1"``
instead of ``"[1]"`` is simply wrong) and a rating must be a bare number. Small models wrap answers in
prose, markdown and "Answer:" prefixes, so the score would measure formatting rather than personalization.
This module recovers the intended label when it can, and leaves the text alone when it cannot, so that
the scorer still treats it the way LaMP does (an unknown label is wrong; a non-number gets the worst rating).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Sequence

from persona_dspy.data.tasks import TaskKind, get_task
from persona_dspy.outputs.validation import PROMPT_ECHO

# Below this difflib ratio two label keys are not considered the same word: 0.8 accepts "scifi", "politic",
# "dystopian", "healthy-living" but rejects "fiction" -> "action" (0.77) and "comedic" -> "comedy" (0.77).
SIMILARITY_CUTOFF = 0.8

# Words that introduce the answer ("Answer: x", "The category is x", "Rating = 4").
_MARKER = re.compile(
    r"\b(?:final\s+answer|answer|category|categories|label|tag|rating|score|output|prediction|genre|class"
    r"|classification|reference|choice)\b(?:\s*[:=]\s*|\s+(?:is|would\s+be|should\s+be)\s*:?\s*)(?P<rest>.+)",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"[*_`#>~]+")
_APOSTROPHE = re.compile(r"['’‘`]")
_NON_WORD = re.compile(r"[\W_]+")
_NUMBER = r"\d+(?:\.\d+)?"
# "on a scale of 1 to 5", "(1-5)", "between 1 and 5": numbers that describe the scale, not the answer.
_SCALE = re.compile(
    rf"(?:on\s+a\s+)?scale\s+(?:of|from)\s+{_NUMBER}\s*(?:to|-|–)\s*{_NUMBER}"
    rf"|\(\s*{_NUMBER}\s*(?:-|–|to)\s*{_NUMBER}\s*\)"
    rf"|(?:from|between)\s+{_NUMBER}\s+(?:to|and)\s+{_NUMBER}",
    re.IGNORECASE,
)
_FRACTION = re.compile(rf"(?<![\d.])({_NUMBER})\s*(?:/|out\s+of)\s*({_NUMBER})", re.IGNORECASE)
_STARS = re.compile(rf"(?<![\d.])({_NUMBER})\s*(?:-\s*)?stars?\b", re.IGNORECASE)
_BARE = re.compile(rf"(?<![\d.])({_NUMBER})(?![\d]|\.\d)")
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                 "nine": 9, "ten": 10}
_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_STAR_GLYPHS = re.compile(r"[★⭐]")


def label_key(text: str) -> str:
    """A comparison key: case, punctuation, quotes, markdown and brackets do not matter; '&' reads as 'and'.

    So "[1]" ~ "1", "Style & Beauty" ~ "style and beauty", "sci-fi" ~ "Sci Fi", "**Politics**." ~ "politics".
    """
    text = _APOSTROPHE.sub("", str(text).casefold().replace("&", " and "))
    return " ".join(_NON_WORD.sub(" ", text).split())


def _candidates(text: str) -> list[str]:
    """Likely answer spans, most specific first: what follows an answer marker (last one first), the first
    and last lines, then the whole text."""
    spans: list[str] = []
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        for match in reversed(list(_MARKER.finditer(_MARKDOWN.sub("", line)))):
            spans.append(match.group("rest"))
    if lines:
        spans.extend([lines[0], lines[-1]])
    spans.append(text)
    seen: set[str] = set()
    return [s for s in spans if not (s in seen or seen.add(s))]


def _as_number_labels(labels: Sequence[str]) -> dict[int, str] | None:
    """{value: label} when every label is an integer in some dress ("3", "[1]"), else None."""
    out: dict[int, str] = {}
    for label in labels:
        key = label_key(label)
        if not key.isdigit():
            return None
        out.setdefault(int(key), label)
    return out


def _number_in(span: str, top: int) -> float | None:
    """The rating a span states: "4/5", "8 out of 10" (rescaled to ``top``), "4 stars", "★★★★", "4.0", "four"."""
    span = _SCALE.sub(" ", span)
    fraction = _FRACTION.search(span)
    if fraction:
        value, scale = float(fraction.group(1)), float(fraction.group(2))
        if scale > 0:
            return value if scale == top else value / scale * top
    stars = _STARS.search(span)
    if stars:
        return float(stars.group(1))
    glyphs = _STAR_GLYPHS.findall(span)
    if glyphs:
        return float(len(glyphs))
    bare = _BARE.search(span)
    if bare:
        return float(bare.group(1))
    word = _WORD.search(span)
    if word:
        return float(_NUMBER_WORDS[word.group(1).lower()])
    return None


def _map_number(spans: Sequence[str], by_value: dict[int, str]) -> str | None:
    """First span that states a number inside the label range; halves round up (3.5 -> 4)."""
    low, top = min(by_value), max(by_value)
    for span in spans:
        value = _number_in(span, top)
        if value is None or not math.isfinite(value):
            continue
        rounded = math.floor(value + 0.5)
        if low <= rounded <= top and rounded in by_value:
            return by_value[rounded]
    return None


def _contained(span_key: str, keys: dict[str, str]) -> str | None:
    """A label occurring as a whole phrase; a label nested inside a longer matching label yields to it
    ("dark comedy" beats "comedy"), otherwise the earliest occurrence wins."""
    padded = f" {span_key} "
    hits: list[tuple[int, int, str]] = []
    for key, label in keys.items():
        at = padded.find(f" {key} ")
        if at >= 0:
            hits.append((at, at + len(key), label))
    outer = [h for h in hits if not any(o is not h and o[0] <= h[0] and h[1] <= o[1] and o[1] - o[0] > h[1] - h[0]
                                        for o in hits)]
    if not outer:
        return None
    return min(outer, key=lambda h: (h[0], -(h[1] - h[0])))[2]


def map_to_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The label in ``labels`` that ``text`` means, or None when it names none of them.

    A text that repeats the prompt's format ("1. `query` (str)", "Literal['1', '2', ...]", field markers) means no
    label, whatever digits or label words it holds: None.

    Tried in order: exact; exact after normalisation (case, punctuation, quotes, markdown, "[1]" ~ "1") of the
    whole text or of the span after "Answer:"/"The category is"; for integer label sets a stated number
    ("4 stars", "4/5", "4.0"); a label contained as a whole phrase; the nearest label by difflib ratio.
    """
    if text is None or not labels:
        return None
    raw = str(text).strip()
    if raw in labels:
        return raw
    if not raw or PROMPT_ECHO.search(raw):
        return None
    keys: dict[str, str] = {}
    for label in labels:
        keys.setdefault(label_key(label), label)
    spans = _candidates(raw)
    span_keys = [label_key(s) for s in spans]
    for key in span_keys:
        if key in keys:
            return keys[key]
    by_value = _as_number_labels(labels)
    if by_value is not None:
        hit = _map_number(spans, by_value)
        if hit is not None:
            return hit
    for key in span_keys:
        hit = _contained(key, keys)
        if hit is not None:
            return hit
    if by_value is not None:
        return None  # string similarity between digits means nothing ("3" is not "close" to "[1]")
    best: tuple[float, int, str] | None = None
    for order, key in enumerate(span_keys):
        if not key:
            continue
        for label_k, label in keys.items():
            ratio = difflib.SequenceMatcher(None, key, label_k).ratio()
            if ratio >= SIMILARITY_CUTOFF and (best is None or (ratio, -order) > (best[0], -best[1])):
                best = (ratio, order, label)
    return best[2] if best else None


def normalize_answer(task_name: str, text: str | None) -> str:
    """What to hand LaMP's scorer: the mapped label for label tasks (the raw text when unmappable, so it is
    scored as LaMP scores it), the stripped text for generation tasks."""
    spec = get_task(task_name)
    raw = "" if text is None else str(text)
    if spec.kind is TaskKind.GENERATION or not spec.labels:
        return raw.strip()
    mapped = map_to_label(raw, spec.labels)
    return raw if mapped is None else mapped


def vote(labels: Sequence[str], kind: TaskKind) -> str | None:
    """The labels' verdict: most common (ties go to the best-ranked), or the rounded mean rating."""
    if not labels:
        return None
    if kind is TaskKind.RATING:
        mean = sum(float(x) for x in labels) / len(labels)
        return str(int(math.floor(mean + 0.5)))
    counts = Counter(labels)
    best = max(counts.values())
    return next(label for label in labels if counts[label] == best)


def supported(answer: str, labels: Sequence[str], kind: TaskKind) -> bool:
    """Whether the user's own retrieved items support ``answer``: one of their labels, or a rating within their
    range. Tasks that generate text are never checked."""
    if kind is TaskKind.RATING:
        try:
            values = [float(label) for label in labels]
            return min(values) <= float(answer) <= max(values)
        except ValueError:
            return False
    if kind is TaskKind.CLASSIFICATION:
        return answer in labels
    return True
