"""A deterministic offline stand-in for an LM, so every DSPy program here runs without a model.

``OfflineEngine`` is a test double, never a model: it reads the prompt a DSPy adapter built (chat, JSON, XML or
plain) and answers each output field by fixed rules (a label named on a persona's preference line or most often in
the evidence, feedback from expected vs produced answers, a persona with a preference line added, ...), so its
outputs are valid for any signature and identical for identical prompts. Its scores say nothing about any model;
reports record its name, ``offline/stand-in``. ``answer_messages`` serves the loopback HTTP test server.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

# dspy and litellm fetch a model-metadata map from GitHub on first use unless told not to; runs stay local.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from dspy.clients.engines.base import validate_request  # noqa: E402
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events  # noqa: E402

from persona_dspy.lm.providers import OFFLINE_MODEL  # noqa: E402
from persona_dspy.testing.prompts import OutputField, Prompt, parse_prompt  # noqa: E402

logger = logging.getLogger(__name__)


_FREE_TEXT_WORDS = 8
_EXPECTED_NAME = re.compile(r"expected|gold|target|reference|correct|true_|label", re.I)
_PRODUCED_NAME = re.compile(r"produced|predict|generated|model_answer|output|response|^answer$", re.I)
_MAX_WORDS_NAME = re.compile(r"max_words|word_limit|max_length|length_cap", re.I)
_PREFERENCE = re.compile(
    r"\b(?:preferred\s+(?:label|answer|option|choice|tag|category|rating|score|value)s?\s*[:=]|prefer(?:s|red)?\b:?)"
    r"\s*(.+)",
    re.IGNORECASE,
)
_HISTORY_LABEL = re.compile(
    r"\b(?:label|tag|category|score|rating|class)\s*[:=]\s*[\"'«]?([^\n;|,\"'»\]\)]+)", re.IGNORECASE
)
_EXPECTED_IN_FEEDBACK = re.compile(r'Expected \\?"([^"\\]+)\\?" but answered')  # JSON may escape the quotes
_TOOL_LINE = re.compile(
    r"^\s*\(\d+\) (\S+), whose description is <desc>.*?</desc>\. It takes arguments (\{[^\n]*\})\.?[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_STOPWORDS = frozenset(
    "the a an and or of to in on for with from by at as is are was were be been this that these those it its "
    "their they them his her he she you your we our not but have has had will would can could about into over "
    "than then there here which what when where who how all any some more most very just also only such".split()
)


# --------------------------------------------------------------------------- the stand-in's rules


def _first_words(text: str, n: int = _FREE_TEXT_WORDS) -> str:
    words = text.replace("[[ ##", "[[ #").split()
    return " ".join(words[:n])


def _quote(text: str, n: int = 12) -> str:
    words = " ".join(str(text).split()).replace('"', "'").split(" ")
    short = " ".join(words[:n]) + (" ..." if len(words) > n else "")
    return f'"{short}"'


def _occurrences(option: Any, text: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(str(option))}(?!\w)", text, re.IGNORECASE))


def _match_option(rest: str, options: Sequence[Any]) -> Any | None:
    """The option a preference phrase names: an exact value, else the earliest (then longest) whole-word hit."""
    cleaned = rest.strip().strip("\"'`*.").strip().lower()
    for option in options:
        if str(option).lower() == cleaned:
            return option
    hits = []
    for option in options:
        match = re.search(rf"(?<!\w){re.escape(str(option))}(?!\w)", rest, re.IGNORECASE)
        if match:
            hits.append((match.start(), -len(str(option)), option))
    return min(hits, key=lambda h: (h[0], h[1]))[2] if hits else None


def _stated_preferences(text: str, options: Sequence[Any]) -> list[Any]:
    """Options named on preference lines ('Preferred label: X', 'prefers X'), oldest first, latest statement last."""
    found: list[Any] = []
    for line in text.splitlines():
        for match in _PREFERENCE.finditer(line):
            option = _match_option(match.group(1), options)
            if option is not None:
                if option in found:
                    found.remove(option)
                found.append(option)
    return found


def _choose_option(options: Sequence[Any], prompt: Prompt) -> tuple[Any, str]:
    """Stated preference, else the option the evidence names most often, else the first option."""
    persona_inputs = "\n".join(v for k, v in prompt.inputs.items() if "persona" in k.lower())
    preferred = _stated_preferences(prompt.instructions, options) or _stated_preferences(persona_inputs, options)
    if len(preferred) == 1:
        return preferred[0], "stated preference"
    candidates = preferred or list(options)
    counts = {i: _occurrences(option, prompt.context_text) for i, option in enumerate(candidates)}
    best = max(counts.values(), default=0)
    if best == 0:
        if preferred:
            return preferred[-1], "latest stated preference"
        return candidates[0], "no evidence, first option"
    tied = [candidates[i] for i, c in counts.items() if c == best]
    if len(tied) == 1:
        return tied[0], f"named {best} times in the evidence"
    if preferred:
        return tied[-1], "latest stated preference among the most frequent"
    return tied[int(prompt.key[:8], 16) % len(tied)], f"tie at {best} mentions, broken by prompt digest"


def _input_named(prompt: Prompt, pattern: re.Pattern[str], exclude: str | None = None) -> tuple[str, str] | None:
    for name, value in prompt.inputs.items():
        if name != exclude and pattern.search(name):
            return name, value
    return None


def _max_words(prompt: Prompt) -> int | None:
    found = _input_named(prompt, _MAX_WORDS_NAME)
    if found and found[1].strip().isdigit():
        return int(found[1].strip())
    match = re.search(r"(?:at most|within|under|no more than|maximum of)\s+(\d+)\s+words", prompt.instructions, re.I)
    return int(match.group(1)) if match else None


def _feedback(prompt: Prompt) -> str:
    expected = _input_named(prompt, _EXPECTED_NAME)
    produced = _input_named(prompt, _PRODUCED_NAME, exclude=expected[0] if expected else None)
    if not expected or not produced:
        return "No expected answer was given, so the persona cannot be checked against this user."
    want, got = expected[1].strip(), produced[1].strip()
    if want.lower() == got.lower():
        return f"Answered correctly ({_quote(want)}); the persona already captures this user's preference."
    return (f"Expected {_quote(want)} but answered {_quote(got)}; "
            f"the persona missed that this user prefers {_quote(want)}.")


def _preference_line(value: str) -> str:
    value = value.strip().rstrip(" .")
    if value.endswith("..."):
        return f"- Prefers answers like: {_quote(value.removesuffix('...').strip())}"
    if len(value.split()) <= 4 and len(value) <= 40:
        return f"- Preferred label: {value}"
    return f"- Prefers answers like: {_quote(value)}"


def _cap_words(lines: list[str], keep: str | None, max_words: int | None) -> str:
    """Join lines within max_words: drop older preference lines first, then cut from the end (``keep`` survives)."""
    def count(ls: list[str]) -> int:
        return sum(len(line.split()) for line in ls)

    if max_words is None or count(lines) <= max_words:
        return "\n".join(lines).strip()
    lines = list(lines)
    for line in [ln for ln in lines if ln != keep and re.match(r"\s*-?\s*Prefer", ln)]:
        if count(lines) <= max_words:
            break
        lines.remove(line)
    if count(lines) <= max_words:
        return "\n".join(lines).strip()
    budget = max(max_words - (len(keep.split()) if keep else 0), 0)
    kept: list[str] = []
    for line in (ln for ln in lines if ln != keep):
        words = line.split()
        if len(words) <= budget:
            kept.append(line)
            budget -= len(words)
        else:
            if budget:
                kept.append(" ".join(words[:budget]))
            break
    if keep:
        kept.append(" ".join(keep.split()[:max_words]))
    return "\n".join(kept).strip()


def _updated_persona(prompt: Prompt, current: str) -> str:
    feedback = _input_named(prompt, re.compile(r"feedback|critique|loss", re.I))
    expected = _EXPECTED_IN_FEEDBACK.findall(feedback[1]) if feedback else []
    lines = [line for line in current.strip().splitlines()]
    if not expected:
        prompt.notes.append("no wrong answers in the feedback; persona kept")
        return _cap_words(lines, None, _max_words(prompt)) or "- No preferences known yet."
    counts = Counter(expected)
    top = max(counts.values())
    value = [v for v in expected if counts[v] == top][-1]
    new_line = _preference_line(value)
    lines = [line for line in lines if line.strip() != new_line.strip()] + [new_line]
    prompt.notes.append(f"added {new_line.strip()!r} from the feedback")
    return _cap_words(lines, new_line, _max_words(prompt))


def _summarized_persona(prompt: Prompt) -> str:
    history = (_input_named(prompt, re.compile(r"history|items|profile|memor|context", re.I)) or ("", ""))[1]
    labels = Counter(v.strip().strip(".").strip() for v in _HISTORY_LABEL.findall(history) if v.strip())
    words = Counter(w for w in re.findall(r"[a-z][a-z'-]{3,}", history.lower()) if w not in _STOPWORDS)
    items = [line for line in history.splitlines() if line.strip()]
    lines = ["Preferences:"]
    if labels:
        lines.append(f"- Preferred label: {labels.most_common(1)[0][0]}")
    if words:
        lines.append(f"- Frequent topics: {', '.join(w for w, _ in words.most_common(3))}.")
    lines.append("Style:")
    if items:
        average = round(sum(len(i.split()) for i in items) / len(items))
        lines.append(f"- Typical item length: about {average} words.")
    else:
        lines.append("- No history yet.")
    prompt.notes.append("summarized the history's most frequent label and words")
    return _cap_words(lines, None, _max_words(prompt))


def _schema_value(schema: Mapping[str, Any], seed: str, defs: Mapping[str, Any] | None = None, depth: int = 0) -> Any:
    """A minimal instance of a JSON schema (the adapters print one for structured output types)."""
    defs = defs if defs is not None else schema.get("$defs", schema.get("definitions", {}))
    if depth > 8:
        return None
    if "$ref" in schema:
        target = defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
        return _schema_value(target, seed, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for union in ("anyOf", "oneOf", "allOf"):
        if schema.get(union):
            options = [s for s in schema[union] if s.get("type") != "null"] or schema[union]
            return _schema_value(options[0], seed, defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: _schema_value(sub, seed, defs, depth + 1) for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items")
        return [_schema_value(items, seed, defs, depth + 1)] if isinstance(items, Mapping) else []
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 1))
        value = max(1, low) if kind == "integer" else 0.5
        high = schema.get("maximum")
        return min(value, high) if high is not None else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if "default" in schema:
        return schema["default"]
    return seed


def _react_step(prompt: Prompt, tool_field: OutputField) -> dict[str, Any]:
    """One ReAct turn: call the first real tool once, then finish."""
    tools = {}
    for name, args in _TOOL_LINE.findall(prompt.instructions):
        try:
            tools[name] = ast.literal_eval(args)
        except (ValueError, SyntaxError):
            tools[name] = {}
    trajectory = prompt.inputs.get("trajectory", "")
    used = re.findall(r"\[\[ ## tool_name_\d+ ## \]\]\s*\n\s*(\S+)", trajectory)
    choices = [t for t in (tool_field.options or tuple(tools)) if str(t) != "finish"]
    if any(u != "finish" for u in used) or not choices:
        finish = next((t for t in tool_field.options if str(t) == "finish"), "finish")
        return {"thought": "I have what I need from the tools; finishing.", "tool": finish, "args": {}}
    tool = choices[0]
    seed = _first_words(prompt.query_text) or "user"
    args = {
        arg: _schema_value(spec if isinstance(spec, Mapping) else {}, seed)
        for arg, spec in tools.get(str(tool), {}).items()
        if not (isinstance(spec, Mapping) and "default" in spec)
    }
    return {"thought": f"I will call {tool} to gather evidence about this user.", "tool": tool, "args": args}


def _free_text(prompt: Prompt) -> str:
    return _first_words(prompt.query_text) or "No content."


def answer_fields(prompt: Prompt) -> dict[str, Any]:
    """The value of each output field, by the rules in the module docstring."""
    values: dict[str, Any] = {}
    names = {f.name for f in prompt.outputs}
    react = None
    if "next_tool_name" in names:
        tool_field = next(f for f in prompt.outputs if f.name == "next_tool_name")
        react = _react_step(prompt, tool_field)
    deferred = []
    for out in prompt.outputs:
        lowered = out.name.lower()
        if react is not None and out.name in ("next_thought", "next_tool_name", "next_tool_args"):
            values[out.name] = {"next_thought": react["thought"], "next_tool_name": react["tool"],
                                "next_tool_args": react["args"]}[out.name]
        elif out.kind == "literal" and out.options:
            choice, why = _choose_option(out.options, prompt)
            values[out.name] = choice
            prompt.notes.append(f"{out.name}={choice!s} ({why})")
        elif out.kind == "str" and re.search(r"feedback|loss|critique", lowered):
            values[out.name] = _feedback(prompt)
        elif out.kind == "str" and lowered in ("new_instruction", "improved_instruction"):  # GEPA's proposer
            current = _input_named(prompt, re.compile(r"^current_instruction$"))
            values[out.name] = _updated_persona(prompt, current[1]) if current else _free_text(prompt)
        elif out.kind == "str" and "persona" in lowered:
            current = _input_named(prompt, re.compile(r"persona", re.I))
            values[out.name] = _updated_persona(prompt, current[1]) if current else _summarized_persona(prompt)
        elif out.kind == "str" and re.search(r"reason|rationale|thought|explanation", lowered):
            deferred.append(out.name)
        elif out.kind == "str":
            values[out.name] = _free_text(prompt)
        elif out.kind == "int":
            values[out.name] = 1
        elif out.kind == "float":
            values[out.name] = 0.5
        elif out.kind == "bool":
            values[out.name] = True
        elif out.kind == "list":
            values[out.name] = {"str": [_free_text(prompt)], "int": [1]}.get(out.item_kind, [])
        elif out.kind == "dict":
            values[out.name] = {}
        else:
            values[out.name] = _schema_value(out.schema or {}, _free_text(prompt))
    for name in deferred:
        detail = "; ".join(prompt.notes) if prompt.notes else "answered from the first words of the query"
        values[name] = f"Offline stand-in, not a model: {detail}."
    return {f.name: values[f.name] for f in prompt.outputs}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def render(prompt: Prompt, values: Mapping[str, Any]) -> str:
    """Write the values in the format the adapter asked for."""
    if prompt.fmt == "json":
        return json.dumps(dict(values), ensure_ascii=False, indent=2)
    if prompt.fmt == "xml":
        return "\n".join(f"<{name}>\n{_as_text(value)}\n</{name}>" for name, value in values.items())
    if prompt.fmt == "chat":
        body = "\n\n".join(f"[[ ## {name} ## ]]\n{_as_text(value)}" for name, value in values.items())
        return f"{body}\n\n[[ ## completed ## ]]"
    return _free_text(prompt)


def answer_messages(messages: Sequence[Mapping[str, Any]], *, json_mode: bool = False) -> str:
    """The stand-in's completion text for OpenAI-style messages (role + content)."""
    prompt = parse_prompt(messages, json_mode=json_mode)
    if prompt.fmt == "plain":
        prompt.inputs = {"prompt": prompt.user_text}
        return _free_text(prompt)
    values = answer_fields(prompt)
    logger.debug("offline stand-in (%s format): %s", prompt.fmt, "; ".join(prompt.notes) or "defaults")
    return render(prompt, values)


def _words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- the dspy engine


def _request_messages(request: Request) -> list[dict[str, str]]:
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


class OfflineEngine:
    """A deterministic stand-in engine for ``dspy.LM``: a test double, never a model.

    It answers any DSPy signature validly and reproducibly from the prompt alone (the rules are in the module
    docstring). Scores measured with it mean nothing about any model. It holds no per-request state, so one
    engine serves many threads; ``calls`` counts completions under a lock.
    """

    model_name = OFFLINE_MODEL

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    def complete(self, request: Request) -> Response:
        validate_request(request)
        messages = _request_messages(request)
        text = answer_messages(messages, json_mode=request.config.response_format is not None)
        with self._lock:
            self._calls += 1
        used, made = sum(_words(m["content"]) for m in messages), _words(text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return Response(
            id=f"offline-{digest}",
            model=OFFLINE_MODEL,
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=used, output_tokens=made, total_tokens=used + made),
        )

    def stream(self, request: Request) -> Iterator[Any]:
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        """Nothing to save: the rules are the code. Lets programs holding this LM be saved."""
        return {}

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> OfflineEngine:
        return cls()


class AsyncOfflineEngine:
    """The async face of an OfflineEngine, so ``acall`` and async programs work offline too."""

    def __init__(self, sync: OfflineEngine | None = None) -> None:
        self.sync = sync or OfflineEngine()

    async def complete(self, request: Request) -> Response:
        return self.sync.complete(request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        for event in self.sync.stream(request):
            yield event

    async def aclose(self) -> None:
        pass

    def dump_state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def load_state(cls, state: Mapping[str, Any]) -> AsyncOfflineEngine:
        return cls()


def offline_lm(
    *,
    temperature: float | None = 0.0,
    max_tokens: int | None = 512,
    cache: bool = False,
    num_retries: int = 0,
    callbacks: list[Any] | None = None,
    **kwargs: Any,
) -> dspy.LM:
    """A ``dspy.LM`` named ``offline/stand-in`` backed by a fresh OfflineEngine (no network, no model)."""
    engine = OfflineEngine()
    return dspy.LM(
        OFFLINE_MODEL,
        engine=engine,
        async_engine=AsyncOfflineEngine(engine),
        temperature=temperature,
        max_tokens=max_tokens,
        cache=cache,
        num_retries=num_retries,
        callbacks=callbacks,
        **kwargs,
    )
