"""What an LM wrote is checked before anything keeps it, and every check is counted.

A weak model can fill the adapter's format and still say nothing: repeat its prompt, write the template's
placeholder or copy the instructions. Such text parses, so the adapter cannot tell; ``rejection`` (personas,
feedback, updates) and ``answer_rejection`` (answers) can. ``OutputStats`` counts, by step, what was checked,
rejected, retried or read as raw text, and the calls, HTTP requests (retries and hedges included), failed requests
and truncations it sees while active; ``record(...)`` adds to
every active ``OutputStats``, so any code path counts without being handed the counter.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import dspy

from persona_dspy.lm.usage import ACTIVE_KEY, LMUsage

STEPS = ("answer", "loss", "update", "summary", "tool_step")
MAX_REASONS = 5
ECHO_WORDS = 10
"""Consecutive words shared with the prompt's instructions that make a text an echo of them."""
COPY_WORDS = 8
"""Consecutive words shared with one of the user's history items that make a summary a copy, not a summary."""
MIN_WORDS = 3
"""Words a free text needs to state anything ("Preferred label: 4" does; "Fender guitars" does not)."""

_PLACEHOLDER = re.compile(r"^[\s\"'`]*\{+\s*['\"]?[\w .-]{0,40}['\"]?\s*\}+[\s\"'`.]*$")
_OBJECT = re.compile(r"^\s*[\[{]\s*['\"]?\w+['\"]?\s*:", re.S)
_PLACEHOLDER_TOKEN = re.compile(r"\{\s*\w+\s*\}")
_FIELD_PLACEHOLDER = re.compile(
    r"\{+\s*['\"]?(?:new_persona|persona|history|feedback|query|context|answer|reasoning|summary|max_words"
    r"|program_inputs|expected_outputs|produced_outputs|instructions|user_summary|input|output)['\"]?\s*\}+",
    re.IGNORECASE,
)
"""A placeholder naming one of the prompts' own fields (``{history}``, ``{new_persona}``): never text of its own."""
PROMPT_ECHO = re.compile(
    r"\[\[\s*##\s*\w+\s*##\s*\]\]|Your (?:input|output) fields are|All interactions will be structured"
    r"|Respond with (?:the corresponding output fields|a JSON object)|In adhering to this structure"
    r"|Literal\[|^\s*\d+\.\s+`\w+`\s+\(|\(must be formatted as a valid Python|# note: the value you produce",
    re.IGNORECASE | re.MULTILINE,
)
"""The adapters' own prompt text (field lists, format notes, markers): a reply holding it repeats its prompt."""


_REFUSAL = re.compile(
    r"^\W*(?:i\s*(?:am|'m)\s+(?:not\s+sure|sorry|unable|not\s+able|afraid)|sorry\b|apologi[sz]e"
    r"|i\s+(?:cannot|can't|can\s+not|could\s+not|couldn't|do\s+not|don't)\s+(?:help|understand|know|provide|determine"
    r"|answer|assist|see|have)|as\s+an\s+ai\b|could\s+you\s+(?:please\s+)?(?:clarify|provide|explain|rephrase|specify)"
    r"|please\s+(?:provide|clarify|specify)|what\s+do\s+you\s+mean|i\s+need\s+more\s+(?:information|context|details)"
    r"|(?:there\s+is\s+)?no\s+(?:information|history|data)\s+(?:is\s+)?(?:available|provided|given))",
    re.IGNORECASE,
)
"""A refusal or a non-answer ("I am not sure what you mean.", "Could you clarify ..."): says nothing about the user."""
_SENTENCES = re.compile(r"[.!?;\n]+")
REPEATED_GRAM = 5
"""A run of this many words said three times over is a model looping, not a summary."""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _shares_run(text: str, source: str, n: int = ECHO_WORDS) -> bool:
    """Whether ``text`` repeats ``n`` consecutive words of ``source``."""
    words, seen = _words(text), _words(source)
    if len(words) < n or len(seen) < n:
        return False
    grams = {tuple(seen[i:i + n]) for i in range(len(seen) - n + 1)}
    return any(tuple(words[i:i + n]) in grams for i in range(len(words) - n + 1))


def repetition(text: str) -> str | None:
    """Why ``text`` is degenerate repetition (a sentence said twice, a 5-word run said three times), or None."""
    sentences = Counter(" ".join(_words(s)) for s in _SENTENCES.split(text) if len(_words(s)) >= MIN_WORDS)
    if sentences:
        sentence, n = sentences.most_common(1)[0]
        if n >= 2:
            return f"a sentence repeated {n} times ({sentence[:40]!r})"
    words = _words(text)
    grams = Counter(tuple(words[i:i + REPEATED_GRAM]) for i in range(len(words) - REPEATED_GRAM + 1))
    if grams and max(grams.values()) >= 3:
        gram, n = grams.most_common(1)[0]
        return f"words repeated {n} times ({' '.join(gram)!r})"
    return None


def copied_text(text: str, sources: tuple[str, ...] | list[str]) -> str | None:
    """Why ``text`` copies one of ``sources`` (COPY_WORDS consecutive words of one), or None."""
    for source in sources:
        if source and _shares_run(text, source, COPY_WORDS):
            return f"text copied word for word from the user's history ({' '.join(_words(source)[:6])!r} ...)"
    return None


def says_nothing(body: str) -> str | None:
    """Why ``body`` states nothing: a refusal, a bare date or number, a name or a few words, or None."""
    if _REFUSAL.search(body):
        return f"a refusal or non-answer ({body[:40]!r})"
    words = [w for w in re.findall(r"[^\W\d_][\w'-]*", body)]
    if not words:
        return f"a bare date or number ({body[:40]!r})"
    if len(_words(body)) < MIN_WORDS:
        return f"too short to say anything ({body[:40]!r})"
    if len(words) <= 6 and all(w[0].isupper() for w in words):
        return f"a bare name or title, not a statement ({body[:40]!r})"
    return None


def rejection(text: str | None, *, instructions: str | tuple[str, ...] = (),
              copied_from: tuple[str, ...] | list[str] = ()) -> str | None:
    """Why ``text`` is not a free text of its own (a persona, summary, feedback or update), or None when it is.

    ``instructions``: the signature's instructions (and any fixed persona text) it must not merely repeat.
    ``copied_from``: texts it must not copy (the user's history items, for a summary of them).
    """
    body = "" if text is None else str(text).strip()
    if not body:
        return "empty"
    if _PLACEHOLDER.match(body):
        return f"a template placeholder ({body[:40]!r})"
    if _OBJECT.match(body):
        return f"a structured object, not text ({body[:40]!r})"
    tokens = _PLACEHOLDER_TOKEN.findall(body)
    if tokens and len(" ".join(tokens)) * 2 >= len(body):
        return f"mostly template placeholders ({', '.join(tokens[:3])})"
    field_token = _FIELD_PLACEHOLDER.search(body)
    if field_token:
        return f"a template placeholder in the text ({field_token.group(0)})"
    if PROMPT_ECHO.search(body):
        return "an echo of the prompt's format (field lists or markers)"
    for source in (instructions,) if isinstance(instructions, str) else instructions:
        if source and _shares_run(body, source):
            return "a copy of the signature's own instructions"
    return says_nothing(body) or repetition(body) or copied_text(body, copied_from)


def answer_rejection(text: str | None, *, prompt: tuple[str, ...] = ()) -> str | None:
    """Why an answer text read from a reply cannot be an answer (an echo, a placeholder), or None.

    An empty answer is not rejected here: it is already what LaMP scores as invalid.
    """
    body = "" if text is None else str(text).strip()
    if not body:
        return None
    if _PLACEHOLDER.match(body) or (_PLACEHOLDER_TOKEN.search(body) and len(body) < 60):
        return f"a template placeholder ({body[:40]!r})"
    if PROMPT_ECHO.search(body):
        return "an echo of the prompt's format (field lists or markers)"
    if any(source and _shares_run(body, source) for source in prompt):
        return "an echo of the prompt"
    return None


def _value(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def finish_reasons(response: Any) -> list[str]:
    """The ``finish_reason`` of every choice of a response (litellm's object, a dict, or dspy's own result)."""
    choices = _value(response, "choices") or []
    reasons = [str(_value(choice, "finish_reason")) for choice in choices]
    own = _value(response, "finish_reason")
    return reasons or ([str(own)] if own is not None else [])


class OutputStats(LMUsage):
    """Counts of LM calls, truncations and validated outputs, across threads (module docstring).

    Calls (and tokens) are counted as ``LMUsage`` counts them, so an LM that calls other LMs (a pool of servers)
    counts as the calls it makes, each once; the truncation of each counted call is read from its history entry.
    """

    def __init__(self) -> None:
        super().__init__()
        self.truncations = 0
        self.checked: Counter[str] = Counter()
        self.invalid: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.reasons: list[str] = []

    def on_lm_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        with self._lock:  # a call that delegated to inner LM calls is not one itself: they are read instead
            instance = None if call_id in self._delegated else self._active.get(call_id)
        super().on_lm_end(call_id, outputs, exception)
        if instance is None or exception is not None:
            return
        for entry in reversed((getattr(instance, "history", None) or [])[-64:]):
            if entry.get("outputs") is outputs:
                if "length" in finish_reasons(entry.get("response")):
                    with self._lock:
                        self.truncations += 1
                return

    # -- what callers record ----------------------------------------------------------------------
    def add(self, step: str, *, checked: int = 0, invalid: str | None = None, retry: bool = False,
            fallback: bool = False) -> None:
        with self._lock:
            self.checked[step] += checked
            if invalid is not None:
                self.invalid[step] += 1
                reason = f"{step}: {invalid}"
                if len(self.reasons) < MAX_REASONS and reason not in self.reasons:
                    self.reasons.append(reason)
            self.retries[step] += int(retry)
            self.fallbacks[step] += int(fallback)

    def merge(self, other: dict[str, Any]) -> None:
        """Add another snapshot's counts (a user's, into a run's total)."""
        with self._lock:
            self.calls += int(other.get("lm_calls", 0))
            self.requests += int(other.get("requests", 0))
            self.errors += int(other.get("errors", 0))
            for kind, n in (other.get("failed_requests") or {}).items():
                self.failed_requests[kind] = self.failed_requests.get(kind, 0) + int(n)
            self.truncations += int(other.get("truncations", 0))
            for name in ("checked", "invalid", "retries", "fallbacks"):
                getattr(self, name).update({k: int(v) for k, v in (other.get(name) or {}).items()})
            for reason in other.get("reasons") or []:
                if len(self.reasons) < MAX_REASONS and reason not in self.reasons:
                    self.reasons.append(reason)

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data, every step named (zeros included), for reports."""
        with self._lock:
            def steps(counter: Counter[str]) -> dict[str, int]:
                return {step: int(counter.get(step, 0)) for step in (*STEPS, *sorted(set(counter) - set(STEPS)))}

            return {"lm_calls": self.calls, "requests": self.requests, "errors": self.errors,
                    "failed_requests": dict(self.failed_requests), "truncations": self.truncations,
                    "checked": steps(self.checked),
                    "invalid": steps(self.invalid), "retries": steps(self.retries),
                    "fallbacks": steps(self.fallbacks), "reasons": list(self.reasons)}


def mostly_invalid(snapshot: dict[str, Any]) -> bool:
    """Whether more than half of the outputs checked were rejected."""
    checked = sum((snapshot.get("checked") or {}).values())
    invalid = sum((snapshot.get("invalid") or {}).values())
    return checked > 0 and invalid * 2 > checked


def active_stats() -> list[OutputStats]:
    """Every OutputStats active here (``counting(stats)`` or among the dspy callbacks), each once."""
    found: dict[int, OutputStats] = {}
    for callback in [*(dspy.settings.get(ACTIVE_KEY, None) or []), *(dspy.settings.get("callbacks", None) or [])]:
        if isinstance(callback, OutputStats):
            found.setdefault(id(callback), callback)
    return list(found.values())


def record(step: str, *, checked: int = 0, invalid: str | None = None, retry: bool = False,
           fallback: bool = False) -> None:
    """Count one validation outcome in every active OutputStats (see the module docstring)."""
    for stats in active_stats():
        stats.add(step, checked=checked, invalid=invalid, retry=retry, fallback=fallback)
