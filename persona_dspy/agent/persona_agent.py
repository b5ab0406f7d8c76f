"""PersonaAgent as a DSPy program: memory retrieval, then an answer whose instructions are the user's persona.

``PersonaReasoning`` answers through the task's signature and its instructions ARE the persona (``agent.persona``),
so the persona aligner and DSPy's own optimizers all optimize the same text; the agent guards them before every
answer. Modes: ``demos`` (the default for label tasks: the question's k most similar past items of the user, within
its scope, become the answer's demonstrations, most similar last, as ``dspy.KNNFewShot`` shows them; small models
copy a label from such turns far better than they read it from a list), ``rag`` (retrieve, then reason and answer
in one call), ``react`` (``dspy.ReAct`` with the memory search as a tool) and ``none`` (the non-personalized
baseline). A small model's free-text answer is mapped onto the label set rather than asked again; an answer that
repeats the prompt or is a placeholder is validated away as the invalid answer LaMP scores, and counted.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import dspy
from dspy.utils.exceptions import AdapterParseError

from persona_dspy.agent.answers import normalize_answer, supported, vote
from persona_dspy.data.scope import MemoryScope
from persona_dspy.data.tasks import default_agent_mode, get_task
from persona_dspy.lm.adapters import STRUCTURED, StructuredAdapter
from persona_dspy.lm.budget import context_window, fit_passages, reply_reserve
from persona_dspy.memory.episodic import EpisodicMemory, SearchMode
from persona_dspy.memory.retrieval import MemoryRetrieval, memory_scope, memory_search_tool, render_passages
from persona_dspy.outputs.budget import bounded_max_tokens
from persona_dspy.outputs.text import field_text_from_response
from persona_dspy.outputs.validation import answer_rejection, record
from persona_dspy.persona.guard import PersonaGuard
from persona_dspy.signatures import demo_signature, task_signature

logger = logging.getLogger(__name__)

AgentMode = Literal["demos", "rag", "react", "none"]
MODES: tuple[str, ...] = ("demos", "rag", "react", "none")
DEFAULT_MODE: AgentMode = "demos"
DEFAULT_DEMO_CHARS = 600
EVIDENCE_CHARS = 100
"""How much of each retrieved item the textual loss is shown (it needs the gist and the user's answer)."""
"""A demonstration's item text is cut at this many characters (at a word): long reviews add tokens, not signal."""
DEFAULT_SUMMARY = "- No history summarised yet: rely on the user's own past items."
DEFAULT_MAX_PERSONA_WORDS = 300
NO_CONTEXT = "(no personal context: answer from the request alone)"
REACT_CONTEXT = "(search the user's history with the tool before answering)"


def is_answer_signature(signature: Any) -> bool:
    """Whether a signature is one that produces the agent's answer (not a ReAct tool step, which also sees it)."""
    outputs = getattr(signature, "output_fields", {}) or {}
    return "answer" in outputs and "next_tool_name" not in outputs


class _AnswerChatAdapter(dspy.ChatAdapter):
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


_ANSWER_ADAPTER = StructuredAdapter(chat=_AnswerChatAdapter())
"""Answers under the server's JSON schema where the LM takes one (a label can then only be a label), else chat."""

REASONING_MAX_CHARS = 400
"""The chain of thought's length bound: under a JSON schema the server enforces it, so a small model that repeats
itself cannot run every answer to max_tokens and leave the JSON unfinished; other adapters show it as a hint."""


class _Fitted(list):
    """Passages after ``fit_passages`` shortened or dropped some, with what it did (the answer's ``context_fit``)."""

    def __init__(self, passages: list, fit: dict[str, Any]) -> None:
        super().__init__(passages)
        self.fit = fit


_PROGRAMS: dict[tuple[str, bool, bool], dspy.Module] = {}


def default_mode(task: str) -> AgentMode:
    """``demos`` for tasks whose past items carry the user's answer (labels, ratings, titles), else ``rag``."""
    return default_agent_mode(task)  # type: ignore[return-value]


def _answer_program(task: str, reasoning: bool, demos: bool = False) -> dspy.Module:
    """A new answer program for the task (chain of thought, or one prediction), with the task's own instructions.

    Adding the reasoning field builds a pydantic model (~10% of a compile's client CPU when every user's agent did
    it); it is built once per task here, and each agent gets a copy that shares the signature (signatures are never
    changed in place, only replaced).
    """
    prototype = _PROGRAMS.get((task, reasoning, demos))
    if prototype is None:
        signature = demo_signature(task) if demos else task_signature(task)
        rationale = dspy.OutputField(desc="${reasoning}", max_length=REASONING_MAX_CHARS)
        prototype = dspy.ChainOfThought(signature, rationale_field=rationale) if reasoning else dspy.Predict(signature)
        prototype = _PROGRAMS.setdefault((task, reasoning, demos), prototype)
    program = prototype.deepcopy()
    for predictor in program.predictors():
        predictor.stage = random.randbytes(8).hex()  # dspy's own per-predictor id, as a new predictor gets
    return program


MAX_BUILT_SIGNATURES = 256
"""Signatures a PersonaReasoning keeps for reuse (an alignment scores ~10 personas on ~2 predictors)."""


class PersonaReasoning(dspy.Module):
    """The persona-conditioned predictor(s) that answer the task; the persona is their instruction text."""

    def __init__(self, task: str, persona: str, mode: AgentMode, tools: Sequence[Callable] = (), max_iters: int = 5,
                 reasoning: bool = True) -> None:
        super().__init__()
        self.mode = mode
        self._built: dict[tuple[int, str], type] = {}  # (id of a base signature, instructions) -> signature
        self._base: dict[int, tuple[type, type]] = {}  # id of a signature built here -> (it, its base)
        signature = task_signature(task)
        if mode == "react":
            self.program = dspy.ReAct(signature.with_instructions(persona), tools=list(tools), max_iters=max_iters)
            full = self.program.react.signature.instructions
            self._tool_suffix = full[len(persona):] if full.startswith(persona) else "\n" + full
        else:  # PersonaAgent validated the mode; "none" keeps the task signature's own instructions
            self.program = _answer_program(task, reasoning, demos=mode == "demos")
            if mode in ("rag", "demos"):
                predictor = self.persona_predictors()[0]
                predictor.signature = self._with_instructions(predictor.signature, persona)

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
            predictor.signature = self._with_instructions(predictor.signature, instructions)

    def _with_instructions(self, signature: type, instructions: str) -> type:
        """``signature.with_instructions(instructions)``, built once per persona text and reused.

        The aligner sets the persona before every answer, and building a signature builds a pydantic model (~5% of
        a compile's client CPU). A signature built here differs from its base only in its instructions, so the one
        built from the base with these instructions is the same signature; one set from outside is a new base.
        """
        entry = self._base.get(id(signature))
        base = entry[1] if entry is not None and entry[0] is signature else signature
        built = self._built.get((id(base), instructions))
        if built is None:
            if len(self._built) >= MAX_BUILT_SIGNATURES:  # an app setting ever new personas: start over
                self._built.clear()
                self._base.clear()
            built = self._built[(id(base), instructions)] = base.with_instructions(instructions)
            self._base[id(built)] = (built, base)  # keeps both alive, so no id is reused while it is a key
        return built

    def _config(self) -> dict[str, Any]:
        """The answer call's max_tokens, sized to its bounded output where the server enforces it (rag, none)."""
        if self.mode == "react":
            return {}
        predictor = self.persona_predictors()[-1]
        cap = bounded_max_tokens(predictor.signature, dspy.settings.lm)
        return {"config": {"max_tokens": cap}} if cap is not None else {}

    def _inputs(self, query: str, context: str | None, demos: list[dspy.Example] | None) -> dict[str, Any]:
        inputs: dict[str, Any] = {"query": query, **self._config()}
        if self.mode == "demos":  # the predictor's own demos (a caller's optimizer may have set some) come first
            inputs["demos"] = [*self.persona_predictors()[-1].demos, *(demos or [])]
        else:
            inputs["context"] = context
        return inputs

    def forward(self, query: str, context: str | None = None,
                demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        return self.program(**self._inputs(query, context, demos))

    async def aforward(self, query: str, context: str | None = None,
                       demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        return await self.program.acall(**self._inputs(query, context, demos))


class PersonaAgent(dspy.Module):
    """A personalized agent for one LaMP task: memory retrieval, persona reasoning, label mapping.

    ``user_id`` binds the agent to a user for apps (``agent(query=...)`` then searches all of that
    user's memory); evaluation and alignment pass an explicit ``scope`` per question instead.

    Every persona it is given (``persona=...``, ``agent.persona = ...``) passes ``persona_guard``: the role and
    rules come from its template, the text given only supplies the user summary, cleaned and within
    ``max_persona_words`` (see ``persona_dspy.persona.guard``); instructions written past the setter are guarded
    before the next answer (``guard_persona``). Mode ``none`` has no persona to guard.
    """

    def __init__(self, task: str, memory: EpisodicMemory | None = None, mode: AgentMode | None = None, *,
                 persona: str | None = None, user_id: str | None = None, k: int = 5,
                 tools: Sequence[Callable] = (), max_iters: int = 5, search_mode: SearchMode = "auto",
                 reasoning: bool | None = None, max_persona_words: int = DEFAULT_MAX_PERSONA_WORDS,
                 demo_chars: int = DEFAULT_DEMO_CHARS, evidence_check: bool = True) -> None:
        super().__init__()
        mode = default_mode(task) if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "demos" and get_task(task).label_field is None:
            raise ValueError(f"mode 'demos' needs past items with the user's answers; {get_task(task).name} has none "
                             "(use mode 'rag')")
        if demo_chars <= 0:
            raise ValueError(f"demo_chars must be positive, got {demo_chars}")
        if reasoning is None:  # a demonstration holds the user's answer, never a reasoning nobody wrote
            reasoning = mode != "demos"
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
        self.demo_chars = demo_chars
        self.evidence_check = evidence_check
        self.memory = memory
        self.persona_guard = PersonaGuard(max_words=max_persona_words)
        if max_persona_words < self.persona_guard.min_words():
            raise ValueError(f"max_persona_words={max_persona_words} is below {self.persona_guard.min_words()}, the "
                             "persona's role and rules plus a minimal summary")
        self.retrieve = MemoryRetrieval(memory, k=k, mode=search_mode) if mode in ("rag", "demos") else None
        all_tools = [memory_search_tool(memory, k=k, mode=search_mode), *tools] if mode == "react" else []
        start = self.persona_guard.apply(persona, fallback=DEFAULT_SUMMARY) if persona and persona.strip() else \
            self.persona_guard.compose(DEFAULT_SUMMARY)
        self.reason = PersonaReasoning(self.task, start, mode, all_tools, max_iters=max_iters, reasoning=reasoning)
        self._guarded: dict[tuple[int, str, str], tuple[PersonaGuard, str]] = {}  # (guard, text, current) -> result
        self._in_force = self._instructions()  # what the setter last wrote (guard_persona compares against it)

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
        self.reason.persona = self._guard(text)
        self._in_force = self._instructions()

    def _instructions(self) -> tuple[str, ...]:
        return tuple(p.signature.instructions for p in self.persona_predictors())

    def guard_persona(self) -> list[str]:
        """Guard the persona instructions in force; the names of the predictors whose instructions it had to change.

        Whatever wrote them past the ``persona`` setter (COPRO, MIPROv2, SIMBA, GEPA, ``load_state``/``load``,
        ``predictor.signature = ...``) is untrusted text until this runs; ``forward`` runs it before every answer
        (a comparison when nothing changed). Nothing usable left keeps the summary last guarded. ReAct's step gets
        the guarded persona plus its tool list back, whatever an optimizer wrote there.
        """
        if self.mode == "none" or self._instructions() == self._in_force:
            return []
        before = dict(zip(self._names(), self._instructions(), strict=True))
        previous = self.persona_guard.summary(self._in_force[-1])
        result = self.persona_guard.check(self.persona, fallback=previous)
        self.persona = result.text
        changed = [name for name, text in zip(self._names(), self._instructions(), strict=True) if before[name] != text]
        if changed:
            logger.warning("persona of %s: instructions written past the guard (%s) were guarded before use",
                           self.user_id or "this agent", ", ".join(changed))
        return changed

    def _names(self) -> list[str]:
        own = {id(p): name for name, p in self.named_predictors()}
        return [own[id(p)] for p in self.persona_predictors()]

    def _guard(self, text: str) -> str:
        """The guarded persona for ``text``, kept per (guard, text, current persona): the aligner sets the same
        persona before every answer, and the guard's result depends on nothing else."""
        current = self.reason.persona
        key = (id(self.persona_guard), text, current)
        known = self._guarded.get(key)
        if known is not None and known[0] is self.persona_guard:
            return known[1]
        result = self.persona_guard.check(text, fallback=self.persona_guard.summary(current))
        if result.dropped:
            logger.warning("persona for %s: the guard dropped %d line(s) that read as rules or instructions",
                           self.user_id or "this agent", len(result.dropped))
        if len(self._guarded) >= MAX_BUILT_SIGNATURES:
            self._guarded.clear()
        self._guarded[key] = (self.persona_guard, result.text)  # keeps the guard alive: its id names no other
        return result.text

    def save(self, path: Any, save_program: bool = False, modules_to_serialize: list | None = None) -> None:
        """dspy's ``Module.save`` for the state (``.json``); a whole-program pickle is refused with the JSON route.

        The agent holds its user's memory (an open Qdrant store and its encoders), which is no program state and
        cannot be pickled; the program is its predictors' state, and the memory is attached again on load.
        """
        if save_program:
            raise TypeError("a PersonaAgent cannot be saved with save_program=True: its memory (an open store and "
                            "encoders) cannot be pickled. Save its state as JSON with persona_dspy.save_program(agent, "
                            "'user.json') (or agent.save('user.json')), and rebuild it with "
                            "persona_dspy.load_program('user.json', memory); see docs/program-files.md")
        super().save(path, save_program=False, modules_to_serialize=modules_to_serialize)

    @property
    def persona_summary(self) -> str:
        """The persona's only free part (its role and rules come from ``persona_guard.template``)."""
        return self.persona_guard.summary(self.persona) if self.mode != "none" else ""

    def persona_predictors(self) -> list[dspy.Predict]:
        return self.reason.persona_predictors()

    def retrieve_ahead(self, questions: Iterable[Mapping[str, Any]]) -> None:
        """Run now the retrieval these questions' answers will run (``rag``; other modes retrieve nothing first).

        Inside ``memory.retrieval.searches_reused()`` the answers then reuse it: a user's searches run back to back
        while their memory is open, instead of reopening it between LM calls when many users share the store's open
        shards (the aligner answers each recent interaction in every iteration).
        """
        if self.retrieve is not None:
            for question in questions:
                self._prepare(question["query"], question.get("scope"))

    def forward(self, query: str, scope: MemoryScope | None = None) -> dspy.Prediction:
        self.guard_persona()
        passages, context, settings = self._prepare(query, scope)
        try:
            with settings():
                prediction = self.reason(query=query, **self._evidence(passages, context))
        except AdapterParseError as exc:
            return self._unparsed(exc, passages, (query, context))
        return self._answer(prediction, passages, (query, context))

    async def aforward(self, query: str, scope: MemoryScope | None = None) -> dspy.Prediction:
        """``forward`` for asyncio (``acall``, ``dspy.asyncify``, ``streamify``): the LM call is awaited."""
        self.guard_persona()
        passages, context, settings = self._prepare(query, scope)
        try:
            with settings():
                prediction = await self.reason.acall(query=query, **self._evidence(passages, context))
        except AdapterParseError as exc:
            return self._unparsed(exc, passages, (query, context))
        return self._answer(prediction, passages, (query, context))

    def _prepare(self, query: str, scope: MemoryScope | None) -> tuple[list, str, Callable[[], ExitStack]]:
        """Passages and context for one question, and the settings its answer call runs under."""
        if self.mode != "none" and scope is None:
            if self.user_id is None:
                raise ValueError("this agent is bound to no user: pass scope=MemoryScope(user_id) or user_id=...")
            scope = MemoryScope(self.user_id)
        passages: list = []
        if self.retrieve is not None:
            retrieved = self.retrieve(query=self.spec.query_text(query) or query, scope=scope)
            passages, context = retrieved.passages, retrieved.context
            render = render_passages
            if self.mode == "demos":
                passages = [p for p in passages if p.label is not None]
                render, context = self._render_demos, ""
            lm = dspy.settings.lm
            window = context_window(lm) if lm is not None else None
            if window:  # retrieved text shrinks to the model's context (persona_dspy.lm.budget)
                passages, fit = fit_passages(passages, render, fixed_text=f"{self.persona}\n{query}",
                                             window=window, reserve=reply_reserve(lm))
                if fit["passages_dropped"] or fit["passages_shortened"]:
                    logger.info("passages fitted to a %d-token context: %s", window, fit)
                    context = render(passages) if self.mode == "rag" else ""
                    passages = _Fitted(passages, fit)
        else:
            context = REACT_CONTEXT if self.mode == "react" else NO_CONTEXT

        def settings() -> ExitStack:
            stack = ExitStack()
            if dspy.settings.adapter in (None, STRUCTURED):  # a caller's own adapter is respected
                stack.enter_context(dspy.context(adapter=_ANSWER_ADAPTER))
            if self.mode == "react":
                stack.enter_context(memory_scope(scope))
            return stack

        return passages, context, settings

    def demonstrations(self, passages: Sequence[Any]) -> list[dspy.Example]:
        """Retrieved past items as the answer's demonstrations: each asked as the task's query (its text cut at
        ``demo_chars``), its label the answer, the most similar last (``passages`` come most similar first)."""
        return [dspy.Example(query=self.spec.interaction_prompt(p.fields or {}, self.demo_chars),
                             answer=normalize_answer(self.task, str(p.label)))
                for p in reversed(list(passages)) if p.label is not None and p.fields]

    def _render_demos(self, passages: list) -> str:
        """The demonstrations' text, for fitting them to the model's context like passages."""
        return "\n".join(f"{d.query}\n{d.answer}" for d in self.demonstrations(passages))

    def _evidence(self, passages: list, context: str) -> dict[str, Any]:
        """What the answer predictor receives besides the query: demonstrations (demos) or the context (others)."""
        return {"demos": self.demonstrations(passages)} if self.mode == "demos" else {"context": context}

    def _answer(self, prediction: dspy.Prediction, passages: list, prompt: tuple[str, str]) -> dspy.Prediction:
        steps = sum(key.startswith("tool_name_") for key in getattr(prediction, "trajectory", None) or {})
        if steps:  # ReAct's tool steps that parsed, so that failed ones are counted out of all of them
            record("tool_step", checked=steps)
        if isinstance(passages, _Fitted):
            return self._checked(str(prediction.answer), str(getattr(prediction, "reasoning", "") or ""),
                                 list(passages), prompt, context_fit=passages.fit)
        raw, reasoning = str(prediction.answer), str(getattr(prediction, "reasoning", "") or "")
        return self._checked(raw, reasoning, passages, prompt)

    def _checked(self, raw: str, reasoning: str, passages: list, prompt: tuple[str, str],
                 **flags: Any) -> dspy.Prediction:
        """The answer, mapped onto the labels, unless validation rejects it (then the invalid empty answer)."""
        reason = answer_rejection(raw, prompt=(self.persona, *prompt))
        record("answer", checked=1, invalid=reason, fallback=bool(flags.get("unparsed")))
        if reason is not None:
            logger.warning("%s: answer rejected (%s): scored invalid", self.task, reason)
            return dspy.Prediction(answer="", raw_answer=raw, reasoning=reasoning, passages=passages,
                                   evidence=self.evidence(passages), invalid=f"answer rejected: {reason}", **flags)
        answer = normalize_answer(self.task, raw)
        checked = self._against_evidence(answer, passages)
        if checked is not None:
            return dspy.Prediction(answer=checked, raw_answer=raw, lm_answer=answer, reasoning=reasoning,
                                   passages=passages, evidence=self.evidence(passages), overruled=True, **flags)
        return dspy.Prediction(answer=answer, raw_answer=raw, lm_answer=answer, reasoning=reasoning,
                               passages=passages, evidence=self.evidence(passages), **flags)

    def _against_evidence(self, answer: str, passages: Sequence[Any]) -> str | None:
        """In ``demos`` mode (``evidence_check``), the vote of the demonstrations when the model's label is one none
        of them carries (or a rating outside their range), else None. A small model under a label schema sometimes
        answers the first label of the list whatever its demonstrations say; the user's own items overrule it."""
        if self.mode != "demos" or not self.evidence_check:
            return None
        labels = [normalize_answer(self.task, str(p.label)) for p in passages if p.label is not None]
        if not labels or supported(answer, labels, self.spec.kind):
            return None
        verdict = vote(labels, self.spec.kind)
        record("answer", fallback=True)
        logger.info("%s: answer %r is not among its %d demonstrations' labels: their vote %r instead", self.task,
                    answer, len(labels), verdict)
        return verdict

    def evidence(self, passages: Sequence[Any]) -> str:
        """What the answer saw of the user's memory, in short lines (item -> the user's answer, as shown), for the
        textual loss: its feedback is about the same demonstrations or passages the answer step read."""
        lines = [f"- {p.text[:EVIDENCE_CHARS].rstrip()}{'...' if len(p.text) > EVIDENCE_CHARS else ''} -> {p.label}"
                 for p in (reversed(list(passages)) if self.mode == "demos" else passages) if p.label is not None]
        return "\n".join(lines)

    def _unparsed(self, exc: AdapterParseError, passages: list, prompt: tuple[str, str]) -> dspy.Prediction:
        if not is_answer_signature(exc.signature):
            # A ReAct tool step, not the answer: its text means nothing as a label. The question gets an invalid
            # (empty) answer, which LaMP's rules score as such, instead of ending the whole run.
            logger.warning("%s: unparsable ReAct tool step (after dspy's JSON retry): answer scored invalid", self.task)
            record("tool_step", checked=1, invalid="unparsable tool step")
            record("answer", checked=1, invalid="no answer: a tool step before it could not be parsed")
            return dspy.Prediction(answer="", raw_answer="", reasoning="", passages=passages,
                                   invalid="unparsable tool step", unparsed=True)
        # Small local models often answer "Politics." or "4 stars": keep their text and map it (if it is one).
        raw = field_text_from_response(exc.lm_response, "answer")
        logger.debug("unparsable answer for %s read as %r", self.task, raw)
        return self._checked(raw, "", passages, prompt, unparsed=True)
