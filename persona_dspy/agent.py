"""PersonaAgent as a DSPy program.

    MemoryRetrieval (rag) --passages--> PersonaReasoning --answer--> label mapping
                      or the memory-search tool inside ReAct (react)

``PersonaReasoning`` is the predictor that answers, through the task's signature (the task action),
and its instructions ARE the persona: reading or writing ``agent.persona`` reads or writes those
instructions, so the persona aligner and DSPy's own optimizers (GEPA, MIPROv2, COPRO) all optimize
the same text. In ``rag`` mode it reasons and answers in one LM call (chain of thought), which keeps
test-time alignment within its call budget. Modes:

- ``rag``: retrieve from the user's memory within the question's scope, then answer;
- ``react``: ``dspy.ReAct`` with the user's memory search as a tool (plus any general tools);
- ``none``: the non-personalized baseline (no memory; the task signature's own instructions).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import dspy
from dspy.utils.exceptions import AdapterParseError

from persona_dspy.answers import normalize_answer
from persona_dspy.memory import EpisodicMemory, SearchMode
from persona_dspy.retrieval import MemoryRetrieval, MemoryScope, render_passages, search_scope
from persona_dspy.tasks import get_task
from signatures import compose_persona, task_signature

logger = logging.getLogger(__name__)

AgentMode = Literal["rag", "react", "none"]
MODES: tuple[str, ...] = ("rag", "react", "none")
DEFAULT_SUMMARY = "- No history summarised yet: rely on the user's own past items."
NO_CONTEXT = "(no personal context: answer from the request alone)"
REACT_CONTEXT = "(search the user's history with the tool before answering)"

_CURRENT_SCOPE: ContextVar[MemoryScope | None] = ContextVar("persona_dspy_memory_scope", default=None)


@contextmanager
def memory_scope(scope: MemoryScope) -> Iterator[None]:
    """Make ``scope`` the one the memory tool searches while a question is answered (thread- and task-local)."""
    token = _CURRENT_SCOPE.set(scope)
    try:
        yield
    finally:
        _CURRENT_SCOPE.reset(token)


def scoped_memory_tool(memory: EpisodicMemory, k: int = 5, mode: SearchMode = "auto") -> Callable[[str], str]:
    """The memory-search tool for ReAct: it searches whatever scope the agent set for the current question."""

    def search_user_history(query: str) -> str:
        """Search this user's own past interactions (items and how the user labeled or rated them).

        Use short keyword queries about the topic of the current request.
        """
        scope = _CURRENT_SCOPE.get()
        if scope is None:
            return "(no user is in scope: the memory tool only works while the agent answers a question)"
        if not query or not query.strip():
            return "(empty query: say what to look for)"
        return render_passages(search_scope(memory, scope, query, k, mode))

    return search_user_history


class PersonaReasoning(dspy.Module):
    """The persona-conditioned predictor(s) that answer the task; the persona is their instruction text."""

    def __init__(self, task: str, persona: str, mode: AgentMode, tools: Sequence[Callable] = (), max_iters: int = 5,
                 reasoning: bool = True) -> None:
        super().__init__()
        self.mode = mode
        signature = task_signature(task)
        if mode == "react":
            self.program = dspy.ReAct(signature.with_instructions(persona), tools=list(tools), max_iters=max_iters)
            full = self.program.react.signature.instructions
            self._tool_suffix = full[len(persona):] if full.startswith(persona) else "\n" + full
        elif mode == "rag":
            sig = signature.with_instructions(persona)
            self.program = dspy.ChainOfThought(sig) if reasoning else dspy.Predict(sig)
        elif mode == "none":
            self.program = dspy.ChainOfThought(signature) if reasoning else dspy.Predict(signature)
        else:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")

    def persona_predictors(self) -> list[dspy.Predict]:
        """The predictors whose instructions are the persona (ReAct's tool-use step adds its tool list after it)."""
        if self.mode == "react":
            return [self.program.react, self.program.extract.predict]
        return [self.program.predict if isinstance(self.program, dspy.ChainOfThought) else self.program]

    @property
    def persona(self) -> str:
        return self.persona_predictors()[-1].signature.instructions

    @persona.setter
    def persona(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a persona must be a non-empty text")
        for predictor in self.persona_predictors():
            instructions = text + self._tool_suffix if predictor is getattr(self.program, "react", None) else text
            predictor.signature = predictor.signature.with_instructions(instructions)

    def forward(self, query: str, context: str) -> dspy.Prediction:
        return self.program(query=query, context=context)


class PersonaAgent(dspy.Module):
    """A personalized agent for one LaMP task: memory retrieval, persona reasoning, label mapping.

    ``user_id`` binds the agent to a user for apps (``agent(query=...)`` then searches all of that
    user's memory); evaluation and alignment pass an explicit ``scope`` per question instead.
    """

    def __init__(self, task: str, memory: EpisodicMemory | None = None, mode: AgentMode = "rag", *,
                 persona: str | None = None, user_id: str | None = None, k: int = 5,
                 tools: Sequence[Callable] = (), max_iters: int = 5, search_mode: SearchMode = "auto",
                 reasoning: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "none" and memory is None:
            raise ValueError(f"mode {mode!r} needs an EpisodicMemory (mode='none' is the non-personalized baseline)")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self.spec = get_task(task)
        self.task = self.spec.name
        self.mode = mode
        self.user_id = user_id
        self.k = k
        self.search_mode = search_mode
        self.max_iters = max_iters
        self.reasoning = reasoning
        self.memory = memory
        self.retrieve = MemoryRetrieval(memory, k=k, mode=search_mode) if mode == "rag" else None
        all_tools = [scoped_memory_tool(memory, k=k, mode=search_mode), *tools] if mode == "react" else []
        self.reason = PersonaReasoning(self.task, persona or compose_persona(DEFAULT_SUMMARY), mode, all_tools,
                                       max_iters=max_iters, reasoning=reasoning)

    @property
    def persona(self) -> str:
        return self.reason.persona

    @persona.setter
    def persona(self, text: str) -> None:
        self.reason.persona = text

    def persona_predictors(self) -> list[dspy.Predict]:
        return self.reason.persona_predictors()

    def forward(self, query: str, scope: MemoryScope | None = None) -> dspy.Prediction:
        if self.mode != "none" and scope is None:
            if self.user_id is None:
                raise ValueError("this agent is bound to no user: pass scope=MemoryScope(user_id) or user_id=...")
            scope = MemoryScope(self.user_id)
        passages: list = []
        if self.mode == "rag":
            retrieved = self.retrieve(query=self.spec.query_text(query) or query, scope=scope)
            passages, context = retrieved.passages, retrieved.context
        else:
            context = REACT_CONTEXT if self.mode == "react" else NO_CONTEXT
        try:
            if self.mode == "react":
                with memory_scope(scope):
                    prediction = self.reason(query=query, context=context)
            else:
                prediction = self.reason(query=query, context=context)
            raw, reasoning = str(prediction.answer), str(getattr(prediction, "reasoning", "") or "")
        except AdapterParseError as exc:
            # Small local models often answer "Politics." or "4 stars": keep their text and map it below.
            raw, reasoning = answer_text_from_response(exc.lm_response), ""
            logger.debug("unparsable answer for %s mapped from %r", self.task, raw)
        return dspy.Prediction(answer=normalize_answer(self.task, raw), raw_answer=raw, reasoning=reasoning,
                               passages=passages)


_FIELD_MARKER = re.compile(r"\[\[\s*##\s*answer\s*##\s*\]\]\s*(.*?)(?=\[\[\s*##|\Z)", re.S)


def answer_text_from_response(response: object) -> str:
    """The answer a model meant, from a response the adapter could not parse (chat markers, JSON or plain text)."""
    text = response if isinstance(response, str) else str(response or "")
    found = _FIELD_MARKER.search(text)
    if found:
        return found.group(1).strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict) and "answer" in value:
            return str(value["answer"]).strip()
    except (ValueError, TypeError):
        pass
    return text.strip()
