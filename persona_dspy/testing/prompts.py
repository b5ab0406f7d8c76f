"""What the offline stand-in (``testing.offline_lm``) reads from a prompt a DSPy adapter built.

``parse_prompt`` turns the messages of a ChatAdapter, JSONAdapter, XMLAdapter or plain prompt into a ``Prompt``:
the instructions, the output fields with their types and accepted values (``OutputField``), and the input values.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from persona_dspy.data.tasks import TASKS

_NOTE = "# note: the value you produce "
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \(")
_INPUT_HEADER = re.compile(r"^\[\[ ## (\w+) ## \]\][ \t]*$", re.MULTILINE)
_OUTPUT_REMINDER = re.compile(r"\n\s*Respond with (?:the corresponding output fields|a JSON object)[\s\S]*$")
_CONTEXT_NAME = re.compile(r"context|passage|memor|history|profile|evidence|retriev|document|trajectory|observ", re.I)
_NON_QUERY_NAME = re.compile(r"persona|feedback|max_words|instruction|" + _CONTEXT_NAME.pattern, re.I)


@dataclass(frozen=True)
class OutputField:
    """One output field as the adapter described it: its name, printed type, and what values it accepts."""

    name: str
    annotation: str
    kind: str  # str | literal | int | float | bool | list | dict | schema
    options: tuple[Any, ...] = ()
    item_kind: str = "str"
    schema: dict[str, Any] | None = None


@dataclass
class Prompt:
    """What the stand-in understood of one request."""

    fmt: str  # chat | json | xml | plain
    instructions: str
    outputs: list[OutputField]
    inputs: dict[str, str]
    user_text: str
    key: str  # stable digest of the whole prompt, used to break ties reproducibly
    notes: list[str] = field(default_factory=list)

    @property
    def context_text(self) -> str:
        """Input fields that hold evidence (context, passages, trajectory); all inputs if none is named so."""
        chosen = [v for k, v in self.inputs.items() if _CONTEXT_NAME.search(k)]
        return "\n".join(chosen) if chosen else "\n".join(self.inputs.values())

    @property
    def query_text(self) -> str:
        """The query's own content: the first non-evidence input, with LaMP's instruction prefix removed."""
        for name, value in self.inputs.items():
            if not _NON_QUERY_NAME.search(name) and value.strip():
                return strip_task_boilerplate(value)
        first = next((v for v in self.inputs.values() if v.strip()), self.user_text)
        return strip_task_boilerplate(first)


def strip_task_boilerplate(text: str) -> str:
    """LaMP prompts open with an instruction; the content starts after a task marker such as 'article: '."""
    for spec in TASKS.values():
        for marker in spec.query_markers:
            at = text.find(marker)
            if at >= 0:
                return text[at + len(marker) :].strip()
    return text.strip()


# --------------------------------------------------------------------------- parsing the adapter's prompt


def _balanced(text: str, start: int) -> str:
    """The text inside the bracket at ``start`` up to its match, skipping quoted strings."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    quote = ""
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return text[start + 1 : i]
        i += 1
    return text[start + 1 :]


def _section(text: str, start: str, end: str) -> str:
    at = text.find(start)
    if at < 0:
        return ""
    rest = text[at + len(start) :]
    stop = rest.find(end)
    return rest if stop < 0 else rest[:stop]


def _field_list(section: str) -> list[tuple[str, str]]:
    """(name, printed annotation) for each numbered field line of 'Your ... fields are:'."""
    found = []
    for line in section.splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            found.append((match.group(1), _balanced(line, match.end() - 1).strip()))
    return found


_SIMPLE_KINDS = {"str": "str", "int": "int", "float": "float", "bool": "bool", "list": "list", "List": "list",
                 "tuple": "list", "set": "list", "Sequence": "list", "dict": "dict", "Dict": "dict",
                 "Mapping": "dict", "Any": "str", "NoneType": "none"}


def _kind_of(node: ast.expr) -> tuple[str, tuple[Any, ...], str]:
    """(kind, literal options, list item kind) of a parsed annotation."""
    if isinstance(node, ast.Name):
        return _SIMPLE_KINDS.get(node.id, "unknown"), (), "str"
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        base = node.value.id
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Literal":
            try:
                return "literal", tuple(ast.literal_eval(a) for a in args), "str"
            except ValueError:
                return "unknown", (), "str"
        if base in ("Union", "Optional"):
            for arg in args:
                kind = _kind_of(arg)
                if kind[0] != "none":
                    return kind
            return "str", (), "str"
        kind = _SIMPLE_KINDS.get(base, "unknown")
        if kind == "list":
            return "list", (), _kind_of(args[0])[0] if args else "str"
        return kind, (), "str"
    return "unknown", (), "str"


def _parse_annotation(annotation: str) -> tuple[str, tuple[Any, ...], str]:
    try:
        return _kind_of(ast.parse(annotation, mode="eval").body)
    except SyntaxError:
        return "unknown", (), "str"


def _output_notes(system: str, fmt: str) -> dict[str, str]:
    """The '# note: the value you produce ...' remark of each output field, unescaped."""
    notes: dict[str, str] = {}
    if fmt == "json":
        block = _section(system, "Outputs will be a JSON object with the following fields.", "\nIn adhering to")
        try:
            structure, _ = json.JSONDecoder().raw_decode(block.strip())
        except ValueError:
            structure = {}
        for name, text in structure.items() if isinstance(structure, dict) else ():
            if isinstance(text, str) and _NOTE in text:
                notes[name] = text.split(_NOTE, 1)[1].strip()
        return notes
    for match in re.finditer(r"^\{(\w+)\}\s+" + re.escape(_NOTE) + r"(.*)$", system, re.MULTILINE):
        notes.setdefault(match.group(1), match.group(2).strip())
    return notes


def _output_field(name: str, annotation: str, note: str) -> OutputField:
    """Typed from the printed annotation; enums, models and custom types fall back on the adapter's note."""
    kind, options, item_kind = _parse_annotation(annotation)
    if kind != "unknown":
        return OutputField(name, annotation, kind, options, item_kind)
    if "one of: " in note:
        return OutputField(name, annotation, "literal", tuple(note.split("one of: ", 1)[1].split("; ")))
    if "JSON schema: " in note:
        try:
            return OutputField(name, annotation, "schema", schema=json.loads(note.split("JSON schema: ", 1)[1]))
        except ValueError:
            pass
    for marker, simple in (("True or False", "bool"), ("single int", "int"), ("single float", "float")):
        if marker in note:
            return OutputField(name, annotation, simple)
    return OutputField(name, annotation, "str")


def _detect_format(system: str, user: str, json_mode: bool) -> str:
    if json_mode or "Outputs will be a JSON object" in system or "Respond with a JSON object" in user:
        return "json"
    if "wrapped in XML tags" in user or re.search(r"^<(\w+)>\n\{\1\}", system, re.MULTILINE):
        return "xml"
    if "[[ ## completed ## ]]" in system or "[[ ## " in user:
        return "chat"
    return "plain"


def _split_inputs(user: str, names: Sequence[str], fmt: str) -> dict[str, str]:
    """Input values from the user message, split on the known input field names only.

    Only declared names split, so section markers nested inside a value (ReAct's trajectory) stay in it.
    """
    values: dict[str, str] = {}
    if fmt == "xml":
        for name in names:
            match = re.search(rf"<{name}>\n?(.*?)\n?</{name}>", user, re.DOTALL)
            if match:
                values[name] = match.group(1).strip()
        return values
    headers = []
    for match in _INPUT_HEADER.finditer(user):
        name = match.group(1)
        if (not names or name in names) and name not in (h.group(1) for h in headers):
            headers.append(match)
    for idx, match in enumerate(headers):
        end = headers[idx + 1].start() if idx + 1 < len(headers) else len(user)
        values[match.group(1)] = user[match.end() : end]
    if headers:
        last = headers[-1].group(1)
        values[last] = _OUTPUT_REMINDER.sub("", values[last])
    return {k: v.strip() for k, v in values.items()}


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def parse_prompt(messages: Sequence[Mapping[str, Any]], *, json_mode: bool = False) -> Prompt:
    """Understand an OpenAI-style message list built by a DSPy adapter (or any plain chat)."""
    system = "\n".join(_message_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    users = [_message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    user = users[-1] if users else ""
    everything = system + "\n\x00\n" + "\n\x00\n".join(_message_text(m.get("content")) for m in messages)
    key = hashlib.sha256(everything.encode("utf-8", "replace")).hexdigest()
    fmt = _detect_format(system, user, json_mode)
    objective = system.split("your objective is:", 1)
    instructions = textwrap.dedent(objective[1]).strip() if len(objective) == 2 else ""
    input_names = [n for n, _ in _field_list(_section(system, "Your input fields are:", "Your output fields are:"))]
    notes = _output_notes(system, fmt)
    outputs = [
        _output_field(name, annotation, notes.get(name, ""))
        for name, annotation in _field_list(_section(system, "Your output fields are:", "All interactions will"))
    ]
    inputs = _split_inputs(user, input_names, fmt) if fmt != "plain" else {}
    if fmt != "plain" and not outputs:
        fmt = "plain"
    return Prompt(fmt, instructions, outputs, inputs, user, key)
