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

Small local models often answer in free text ("Politics.", "4 stars") instead of the adapter's format. Such an
answer is kept and mapped onto the label set (``answer_text_from_response`` then ``normalize_answer``) rather than
asked again: unless an adapter is configured, the answer call runs without ChatAdapter's JSON retry, which would
cost a second LM call and replace the model's own words with the retry's. Only the answer's parse failure is
handled so; a ReAct tool step that cannot be parsed (after its JSON retry) raises.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import dspy
from dspy.utils.exceptions import AdapterParseError

from optimizers.persona_guard import PersonaGuard
from persona_dspy.agent.answers import normalize_answer
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import get_task
from persona_dspy.memory.episodic import EpisodicMemory, SearchMode
from persona_dspy.memory.retrieval import MemoryRetrieval, memory_scope, memory_search_tool
from signatures import task_signature

logger = logging.getLogger(__name__)

AgentMode = Literal["rag", "react", "none"]
MODES: tuple[str, ...] = ("rag", "react", "none")
DEFAULT_SUMMARY = "- No history summarised yet: rely on the user's own past items."
DEFAULT_MAX_PERSONA_WORDS = 300
NO_CONTEXT = "(no personal context: answer from the request alone)"
REACT_CONTEXT = "(search the user's history with the tool before answering)"


def is_answer_signature(signature: Any) -> bool:
    """Whether a signature is one that produces the agent's answer (not a ReAct tool step, which also sees it)."""
    outputs = getattr(signature, "output_fields", {}) or {}
    return "answer" in outputs and "next_tool_name" not in outputs


class _AnswerAdapter(dspy.ChatAdapter):
    """ChatAdapter without the JSON retry for the answer call; ReAct's tool steps keep it (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(use_json_adapter_fallback=False)
        self._steps = dspy.ChatAdapter()

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if is_answer_signature(signature):
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)
        return self._steps(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: list[dict[str, Any]],
                    inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if is_answer_signature(signature):
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)
        return await self._steps.acall(lm, lm_kwargs, signature, demos, inputs)


_ANSWER_ADAPTER = _AnswerAdapter()


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
        else:  # PersonaAgent validated the mode; "none" keeps the task signature's own instructions
            sig = signature.with_instructions(persona) if mode == "rag" else signature
            self.program = dspy.ChainOfThought(sig) if reasoning else dspy.Predict(sig)

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

    Every persona it is given (``persona=...``, ``agent.persona = ...``) passes ``persona_guard``: the role and
    rules come from its template, the text given only supplies the user summary, cleaned and within
    ``max_persona_words`` (see ``optimizers.persona_guard``). Mode ``none`` has no persona to guard.
    """

    def __init__(self, task: str, memory: EpisodicMemory | None = None, mode: AgentMode = "rag", *,
                 persona: str | None = None, user_id: str | None = None, k: int = 5,
                 tools: Sequence[Callable] = (), max_iters: int = 5, search_mode: SearchMode = "auto",
                 reasoning: bool = True, max_persona_words: int = DEFAULT_MAX_PERSONA_WORDS) -> None:
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
        self.persona_guard = PersonaGuard(max_words=max_persona_words)
        if max_persona_words < self.persona_guard.min_words():
            raise ValueError(f"max_persona_words={max_persona_words} is below {self.persona_guard.min_words()}, the "
                             "persona's role and rules plus a minimal summary")
        self.retrieve = MemoryRetrieval(memory, k=k, mode=search_mode) if mode == "rag" else None
        all_tools = [memory_search_tool(memory, k=k, mode=search_mode), *tools] if mode == "react" else []
        start = self.persona_guard.apply(persona, fallback=DEFAULT_SUMMARY) if persona and persona.strip() else \
            self.persona_guard.compose(DEFAULT_SUMMARY)
        self.reason = PersonaReasoning(self.task, start, mode, all_tools, max_iters=max_iters, reasoning=reasoning)

    @property
    def persona(self) -> str:
        return self.reason.persona

    @persona.setter
    def persona(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a persona must be a non-empty text")
        if self.mode == "none":
            self.reason.persona = text
            return
        result = self.persona_guard.check(text, fallback=self.persona_guard.summary(self.reason.persona))
        if result.dropped:
            logger.warning("persona for %s: the guard dropped %d line(s) that read as rules or instructions",
                           self.user_id or "this agent", len(result.dropped))
        self.reason.persona = result.text

    @property
    def persona_summary(self) -> str:
        """The persona's only free part (its role and rules come from ``persona_guard.template``)."""
        return self.persona_guard.summary(self.persona) if self.mode != "none" else ""

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
        answering = dspy.context(adapter=_ANSWER_ADAPTER) if dspy.settings.adapter is None else nullcontext()
        scoped = memory_scope(scope) if self.mode == "react" else nullcontext()
        try:
            with answering, scoped:
                prediction = self.reason(query=query, context=context)
            raw, reasoning = str(prediction.answer), str(getattr(prediction, "reasoning", "") or "")
        except AdapterParseError as exc:
            if not is_answer_signature(exc.signature):
                raise  # a ReAct tool step, not the answer: its text means nothing as a label
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
