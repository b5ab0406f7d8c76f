"""PersonaAligner: PersonaAgent's test-time user preference alignment, as a DSPy teleprompter.

The persona is an optimizable instruction. One step: run the program on a batch of the user's recent interactions
-> an LLM's feedback per item (``TextualLossMetric``) -> the feedback aggregated -> an LLM rewrites the user summary
(``PersonaUpdate``) -> ``PersonaGuard`` rebuilds the persona. A candidate replaces the best persona only with a
strictly higher validation score, so the result is never worse than the start on that slice. It works on any DSPy
program whose predictors carry the persona (``persona_predictors``); an item that cannot be answered raises
``AlignmentError`` rather than being scored on noise.
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import dspy
from dspy.teleprompt.teleprompt import Teleprompter
from persona_dspy.optimizers.persona_predictors import PersonaPredictors, PredictorChoice, describe_choice
from persona_dspy.optimizers.textual_loss import Metric, ProgramFields, TextualLossMetric, resolve_fields, score_of
from persona_dspy.signatures.persona import PersonaTemplate, PersonaUpdate

from persona_dspy.lm.usage import LMUsage
from persona_dspy.outputs.text import TextOutput, predict_text
from persona_dspy.outputs.validation import record
from persona_dspy.persona.guard import GuardResult, PersonaGuard, PredictorGuards, guard_program, template_for

logger = logging.getLogger(__name__)


class PersonaAccess(Protocol):
    """How to read and write the persona of a program."""

    def get(self, program: dspy.Module) -> str: ...

    def set(self, program: dspy.Module, persona: str) -> None: ...


class PersonaAttribute:
    """Programs that expose ``persona`` themselves (PersonaAgent keeps ReAct's tool list intact this way)."""

    def get(self, program: dspy.Module) -> str:
        return program.persona

    def set(self, program: dspy.Module, persona: str) -> None:
        program.persona = persona


class AlignmentError(RuntimeError):
    """The program could not answer an alignment or validation item, even after retries."""


def has_persona_property(program: dspy.Module) -> bool:
    return isinstance(getattr(type(program), "persona", None), property)


def aggregate_feedback(items: Sequence[tuple[float, str]], max_chars: int = 4000) -> str:
    """The 'gradient': feedback on mistakes first (worst first), duplicates dropped, within a size cap."""
    lines: list[str] = []
    seen: set[str] = set()
    for score, text in sorted(items, key=lambda pair: pair[0]):
        key = " ".join(text.lower().split())
        if not key or key in seen:
            continue
        seen.add(key)
        verdict = "wrong" if score < 1 else "right"
        lines.append(f"- ({verdict}) {text}")
    out = "\n".join(lines)
    return out if len(out) <= max_chars else out[:max_chars].rsplit("\n", 1)[0]


MAX_EVIDENCE_LINES = 10


def shown_evidence(predictions: Sequence[Any]) -> str:
    """The user's past items the answers were shown (``evidence`` of each prediction), once each, for the update."""
    lines = dict.fromkeys(line for p in predictions for line in str(getattr(p, "evidence", "") or "").splitlines()
                          if line.strip())
    if not lines:
        return ""
    return "\nThe user's past items the assistant was shown (item -> their answer):\n" + "\n".join(
        list(lines)[:MAX_EVIDENCE_LINES])


@dataclass
class _Evaluation:
    persona: str
    score: float


@dataclass
class AlignmentStep:
    """One iteration's record: the feedback it read and the candidates it scored."""

    iteration: int
    feedback: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = 0.0


class PersonaAligner(Teleprompter):
    """Align a program's persona to one user from their recent interactions (see module docstring).

    Trade-off: each step starts from the previous step's best candidate even when it scores below the best so
    far (exploration), while the persona returned is the best so far (the first of equals).

    A program without a ``persona`` property gets ``persona_guarding`` (``PredictorGuards``): ``guard_program``
    then guards what a later optimizer or ``load_state`` writes into its persona predictors. The compiled program
    follows dspy's result conventions: ``_compiled = True`` (an outer optimizer leaves it
    alone) and ``candidate_programs``, best first, each ``{"program", "score", "persona"}`` like COPRO's and
    MIPROv2's. It also carries ``persona_history`` (every persona scored, with its feedback and whether it only
    repeated one), ``scores_per_iteration``, ``alignment`` (settings, scores, ``lm_usage``) and ``lm_calls`` (LM
    calls of the whole compile).

    Args:
        metric: ``metric(example, prediction) -> float`` in [0, 1] (higher is better).
        batch_size: recent interactions per step.
        iterations: update steps.
        candidates_per_step: personas proposed per step (more than one samples at ``candidate_temperature``).
        max_persona_words: the persona's length cap (PersonaGuard enforces it); at least the starting persona's
            role and rules plus ``guard.min_summary_words``, checked by ``compile``.
        task_lm: the LM the program answers with (default: the current one).
        optimizer_lm: the LM for loss and update (default: the task LM).
        stop_when_perfect: stop once the validation slice is answered perfectly (saves calls).
        rng: for reproducible candidate sampling (default: ``random.Random(seed)``).
        seed: the seed of that RNG when no ``rng`` is given (``compile(seed=...)`` overrides it for one compile).
        num_threads: answers of a batch or validation slice run in parallel on this many threads (default: one
            after another); each worker runs in a copy of the caller's dspy context (LM, adapter, usage counters).
        template: the persona's fixed role and rules (default: the program's ``persona_guard.template`` if it has
            one, else the default template when the starting persona is built on it, else none: all summary).
        answer_retries: extra attempts for an item the program fails to answer before ``AlignmentError``.
        persona_predictors: which predictors carry the persona: names, a predicate ``(name, predictor) -> bool``,
            or None for those whose instructions contain ``persona`` (see ``.persona_predictors``).
        persona: the starting persona text as written into the program (default: the program's ``persona``).
        input_fields / output_fields: the program's fields, when the examples and signatures cannot tell.
    """

    def __init__(self, metric: Metric, *, batch_size: int = 3, iterations: int = 3, candidates_per_step: int = 1,
                 max_persona_words: int = 300, task_lm: dspy.LM | None = None, optimizer_lm: dspy.LM | None = None,
                 candidate_temperature: float = 0.7, stop_when_perfect: bool = True,
                 rng: random.Random | None = None, template: PersonaTemplate | None = None,
                 answer_retries: int = 1, persona_predictors: PredictorChoice = None, persona: str | None = None,
                 input_fields: Sequence[str] | None = None, output_fields: Sequence[str] | None = None,
                 seed: int | None = None, num_threads: int | None = None) -> None:
        super().__init__()
        if batch_size < 1 or iterations < 0 or candidates_per_step < 1 or max_persona_words < 40 or answer_retries < 0:
            raise ValueError("batch_size and candidates_per_step must be >= 1, iterations and answer_retries >= 0, "
                             "max_persona_words >= 40")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.metric = metric
        self.batch_size = batch_size
        self.iterations = iterations
        self.candidates_per_step = candidates_per_step
        self.max_persona_words = max_persona_words
        self.task_lm = task_lm
        self.optimizer_lm = optimizer_lm
        self.candidate_temperature = candidate_temperature
        self.stop_when_perfect = stop_when_perfect
        self.seed = seed
        self.rng = rng or random.Random(0 if seed is None else seed)
        self.num_threads = num_threads
        self.update = dspy.Predict(PersonaUpdate)
        self.template = template
        self.answer_retries = answer_retries
        self.persona_predictors = persona_predictors
        self.persona = persona
        self.input_fields = tuple(input_fields) if input_fields is not None else None
        self.output_fields = tuple(output_fields) if output_fields is not None else None

    def settings(self) -> dict[str, Any]:
        """The configuration, for program files and reports."""
        return {"optimizer": "PersonaAligner", "batch_size": self.batch_size, "iterations": self.iterations,
                "candidates_per_step": self.candidates_per_step, "max_persona_words": self.max_persona_words,
                "candidate_temperature": self.candidate_temperature, "stop_when_perfect": self.stop_when_perfect,
                "seed": self.seed, "num_threads": self.num_threads}

    def get_params(self) -> dict[str, Any]:
        """The configuration as JSON-safe values (dspy's default returns live LMs, metrics and predictors)."""
        template = self.template
        return {**self.settings(), "metric": _name_of(self.metric), "task_lm": _model_of(self.task_lm),
                "optimizer_lm": _model_of(self.optimizer_lm), "answer_retries": self.answer_retries,
                "template": None if template is None else {"role": template.role, "rules": list(template.rules)},
                "persona_predictors": describe_choice(self.persona_predictors), "persona": self.persona,
                "input_fields": None if self.input_fields is None else list(self.input_fields),
                "output_fields": None if self.output_fields is None else list(self.output_fields)}

    def guard_for(self, program: dspy.Module, persona: str) -> PersonaGuard:
        """The guard for this program's personas: its template (see ``template``) with this aligner's cap."""
        own = getattr(program, "persona_guard", None)
        template = self.template or (own.template if isinstance(own, PersonaGuard) else template_for(persona))
        return PersonaGuard(max_words=self.max_persona_words, template=template)

    def access_for(self, program: dspy.Module) -> tuple[PersonaAccess, PersonaGuard]:
        """How to read and write this program's persona, and the guard of the persona the loop works on."""
        if has_persona_property(program) and self.persona_predictors is None and self.persona is None:
            return PersonaAttribute(), self.guard_for(program, program.persona)
        own = getattr(program, "persona_guard", None)
        template = self.template or (own.template if isinstance(own, PersonaGuard) else None)
        access = PersonaPredictors(program, self.persona_predictors, self.persona,
                                   max_words=self.max_persona_words, template=template)
        return access, access.guard

    def fields_for(self, program: dspy.Module, example: dspy.Example) -> ProgramFields:
        """The program's input and output fields: named, or read from the example and the predictors' signatures."""
        declared = {name for p in program.predictors() for name in p.signature.output_fields}
        return resolve_fields(example, input_fields=self.input_fields, output_fields=self.output_fields,
                              declared_outputs=declared)

    # -- the loop --------------------------------------------------------------------------------
    def compile(self, student: dspy.Module, *, trainset: list[dspy.Example], teacher: dspy.Module | None = None,
                valset: list[dspy.Example] | None = None, num_threads: int | None = None, seed: int | None = None,
                **kwargs: Any) -> dspy.Module:
        """Align ``student``'s persona on ``trainset`` (dspy's ``Teleprompter.compile`` signature).

        ``teacher`` is not used: the user's own answers are the only targets. ``num_threads`` and ``seed`` override
        the constructor's for this compile. Other keywords (another optimizer's, passed through by a pipeline) are
        ignored with one warning, as dspy's optimizers do.
        """
        if kwargs:
            logger.warning("PersonaAligner.compile ignores argument(s) it does not use: %s", ", ".join(sorted(kwargs)))
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        threads = num_threads or self.num_threads or 1
        rng = random.Random(seed) if seed is not None else self.rng
        if teacher is not None:
            raise ValueError("PersonaAligner does not use a teacher: the user's own answers are the targets")
        if not trainset:
            raise ValueError("PersonaAligner needs at least one recent interaction in trainset")
        valset = list(valset) if valset else list(trainset)
        program = student.deepcopy()
        fields = self.fields_for(program, trainset[0])  # fail before any LM call when the fields are unclear
        loss = TextualLossMetric(self.metric, input_fields=fields.inputs, output_fields=fields.outputs)
        access, guard = self.access_for(program)
        floor = guard.min_words()
        if self.max_persona_words < floor:  # the guard would have to break the cap to keep role, rules and summary
            raise ValueError(f"max_persona_words={self.max_persona_words} is below {floor}, the persona's "
                             f"role and rules plus min_summary_words={guard.min_summary_words}")
        if isinstance(getattr(program, "persona_guard", None), PersonaGuard):
            program.persona_guard = guard  # the program's own setter enforces this compile's cap too
        start = guard.check(access.get(program))  # the initial or saved persona is guarded like any candidate
        if start.intervened:
            logger.warning("the starting persona needed the guard (%d line(s) dropped)", len(start.dropped))
        start_persona = start.text
        interventions = int(start.intervened)
        usage = LMUsage()
        started = time.perf_counter()
        task_lm = self.task_lm or dspy.settings.lm  # None when every predictor has its own (BetterTogether)
        own_lms = [p.lm for p in program.predictors() if p.lm is not None]
        if task_lm is None and len(own_lms) < len(program.predictors()):
            raise ValueError("no LM: configure dspy (dspy.configure(lm=...)), pass task_lm or set the program's LMs")
        optimizer_lm = self.optimizer_lm or task_lm or own_lms[-1]
        cache: dict[tuple[str, Any], tuple[Any, float]] = {}  # (persona, example key) -> (prediction, score)
        fallbacks: Counter[str] = Counter()  # replies read as raw text, by step (see persona_dspy.outputs.text)
        invalid: Counter[str] = Counter()  # outputs rejected by validation (after their retry), by step
        fixed_batch = len(trainset) <= self.batch_size  # every step reads the same interactions
        with usage.counting(*[lm for lm in (task_lm, optimizer_lm) if lm is not None], *own_lms):
            current = self._evaluate(program, access, start_persona, valset, task_lm, cache, threads)
            best = current
            seen: dict[str, float] = {start_persona: current.score}
            steps: list[AlignmentStep] = []
            for iteration in range(self.iterations):
                if self.stop_when_perfect and best.score >= 1.0:
                    logger.info("validation slice answered perfectly: stopping after %d steps", iteration)
                    break
                batch_idx = self._batch(len(trainset), iteration)
                batch = [trainset[i] for i in batch_idx]
                outputs = self._answer_all(program, access, current.persona, batch, task_lm, cache, threads)
                with dspy.context(lm=optimizer_lm):
                    feedback = [loss.feedback_output(ex, pred, current.persona) for ex, (pred, _) in
                                zip(batch, outputs, strict=True)]
                    fallbacks["loss"] += sum(f.fallback is not None for f in feedback)
                    invalid["loss"] += sum(f.invalid is not None for f in feedback)
                    usable = [(score, f.text) for (_, score), f in zip(outputs, feedback, strict=True)
                              if f.invalid is None]
                    gradient = aggregate_feedback(usable) if usable else ""
                    if gradient:  # the update reads the same memory the answers and the feedback were based on
                        gradient += shown_evidence([pred for pred, _ in outputs])
                    current_summary = guard.summary(current.persona)
                    copied = [str(v) for ex in batch for v in ex.inputs().values() if isinstance(v, str)]
                    proposals = (self._propose(current_summary, gradient, guard, fallbacks, invalid, rng, copied)
                                 if usable else [])  # no feedback to act on: the persona stays as it is
                    if not usable:
                        logger.warning("step %d: every feedback was rejected; the persona is kept", iteration + 1)
                step = AlignmentStep(iteration + 1, gradient)
                step_best: _Evaluation | None = None
                for proposal in proposals:
                    guarded: GuardResult = guard.check(proposal, fallback=current_summary, summary_only=True)
                    interventions += int(guarded.intervened)
                    candidate = guarded.text
                    if candidate in seen:
                        step.candidates.append({"persona": candidate, "score": seen[candidate], "repeat": True})
                        continue
                    evaluation = self._evaluate(program, access, candidate, valset, task_lm, cache, threads)
                    seen[candidate] = evaluation.score
                    step.candidates.append({"persona": candidate, "score": evaluation.score, "repeat": False})
                    if step_best is None or evaluation.score > step_best.score:  # the first of equals
                        step_best = evaluation
                if step_best is not None:
                    current = step_best  # explore from it even when worse than the best (class docstring)
                    if step_best.score > best.score:  # ties keep the older persona
                        best = step_best
                step.best_score = best.score
                steps.append(step)
                if step_best is None and fixed_batch and self.candidates_per_step == 1:
                    # same persona, same batch, one deterministic proposal: the next step would replay this one
                    logger.info("step %d only repeated a persona: stopping", iteration + 1)
                    break
            access.set(program, best.persona)
        if isinstance(access, PersonaPredictors):  # the result guards itself after later writes (guard_program)
            program.persona_guarding = PredictorGuards(dict(access.guards))
            guard_program(program)
        program.persona_history = [{"iteration": 0, "persona": start_persona, "score": seen[start_persona]}] + [
            {"iteration": s.iteration, "persona": c["persona"], "score": c["score"], "repeat": c["repeat"],
             "feedback": s.feedback}
            for s in steps for c in s.candidates
        ]
        program.candidate_programs = [{"program": self._with_persona(program, access, p), "score": s, "persona": p}
                                      for p, s in sorted(seen.items(), key=lambda pair: -pair[1])]
        program.scores_per_iteration = [seen[start_persona]] + [s.best_score for s in steps]
        program.alignment = {
            **self.settings(), "start_score": seen[start_persona], "best_score": best.score,
            "improved": best.score > seen[start_persona], "steps_run": len(steps), "valset_size": len(valset),
            "trainset_size": len(trainset), "guard_interventions": interventions,
            "input_fields": list(fields.inputs), "output_fields": list(fields.outputs),
            "persona_predictors": list(getattr(access, "names", [])) or "persona property",
            "guarded_start": start.intervened, "lm_usage": usage.snapshot(),
            "fallbacks": {"answer": sum(bool(getattr(p, "unparsed", False)) for p, _ in cache.values()),
                          "loss": fallbacks["loss"], "update": fallbacks["update"]},
            "invalid": {"answer": sum(bool(getattr(p, "invalid", None)) for p, _ in cache.values()),
                        "loss": invalid["loss"], "update": invalid["update"]},
            "answers": len(cache),
            "seconds": round(time.perf_counter() - started, 3),
        }
        program.lm_calls = usage.calls
        program._compiled = True  # dspy's mark of an optimized program: outer optimizers leave it as it is
        return program

    # -- pieces ----------------------------------------------------------------------------------
    def _batch(self, n: int, iteration: int) -> list[int]:
        """Windows over the trainset (oldest to newest), newest first: step 1 sees the latest interactions."""
        if n <= self.batch_size:
            return list(range(n))
        end = n - (iteration * self.batch_size) % n
        return [(end - self.batch_size + j) % n for j in range(self.batch_size)]

    def _answer(self, program: dspy.Module, access: PersonaAccess, persona: str, example: dspy.Example,
                lm: dspy.LM, cache: dict) -> tuple[Any, float]:
        # A batch item that is also in the valset is answered once, whether the valset holds the same objects
        # or copies: an example_id names one interaction; examples without one are matched by identity.
        example_id = example.get("example_id")
        cache_key = (persona, ("example_id", example_id) if example_id is not None else ("object", id(example)))
        if cache_key in cache:
            return cache[cache_key]
        access.set(program, persona)
        name = "an example" if example_id is None else example_id
        with dspy.context(lm=lm) if lm is not None else nullcontext():
            for attempt in range(self.answer_retries + 1):
                try:
                    prediction = program(**example.inputs())
                    break
                except Exception as exc:  # a missing answer is not a 0 score: retry, then fail the whole alignment
                    logger.warning("program failed on %s (attempt %d of %d): %s: %s", name, attempt + 1,
                                   self.answer_retries + 1, type(exc).__name__, exc)
                    if attempt == self.answer_retries:
                        raise AlignmentError(f"the program could not answer {name} after {attempt + 1} attempt(s): "
                                             f"{type(exc).__name__}: {exc}") from exc
            score = score_of(self.metric, example, prediction)  # outside the try: a broken metric must raise
        cache[cache_key] = (prediction, score)
        return prediction, score

    def _answer_all(self, program: dspy.Module, access: PersonaAccess, persona: str, examples: list[dspy.Example],
                    lm: dspy.LM | None, cache: dict, threads: int) -> list[tuple[Any, float]]:
        """``_answer`` for each example, in order; on ``threads`` workers when more than one.

        Every item is answered with the same persona, so workers share the program. Each runs in its own copy of
        the caller's context: dspy's settings (LM, adapter, usage counters) travel in context variables, and
        ``dspy.configure`` works only from the thread that first called it, so workers must not configure.
        """
        if threads <= 1 or len(examples) <= 1:
            return [self._answer(program, access, persona, ex, lm, cache) for ex in examples]
        access.set(program, persona)  # written once before the workers start, not raced by them
        with ThreadPoolExecutor(max_workers=min(threads, len(examples)), thread_name_prefix="persona-align") as pool:
            futures = [pool.submit(contextvars.copy_context().run, self._answer, program, access, persona, ex, lm,
                                   cache) for ex in examples]
            return [future.result() for future in futures]

    def _evaluate(self, program: dspy.Module, access: PersonaAccess, persona: str, valset: list[dspy.Example],
                  lm: dspy.LM | None, cache: dict, threads: int = 1) -> _Evaluation:
        scores = [score for _, score in self._answer_all(program, access, persona, valset, lm, cache, threads)]
        return _Evaluation(persona, sum(scores) / len(scores))

    @staticmethod
    def _with_persona(program: dspy.Module, access: PersonaAccess, persona: str) -> dspy.Module:
        """A copy of the aligned program carrying ``persona`` (an entry of ``candidate_programs``)."""
        candidate = program.deepcopy()
        candidate.__dict__.pop("candidate_programs", None)  # an earlier compile's: no nesting across re-alignments
        access.set(candidate, persona)
        candidate._compiled = True
        return candidate

    def _propose(self, summary: str, feedback: str, guard: PersonaGuard, fallbacks: Counter[str],
                 invalid: Counter[str], rng: random.Random | None = None,
                 copied_from: Sequence[str] = ()) -> list[str]:
        """New user summaries from the update LM: it sees and writes only the summary, never the role or rules.

        A rewrite that fails validation (a placeholder, the prompt repeated, after its one retry) is no candidate."""
        max_words = guard.summary_budget()
        proposals = []
        for i in range(self.candidates_per_step):
            config: dict[str, Any] = {}
            if i > 0:
                config = {"temperature": self.candidate_temperature, "rollout_id": (rng or self.rng).randrange(1 << 30)}
            output = predict_text(self.update, "new_persona", step="update", config=config, persona=summary,
                                  feedback=feedback or "- (no feedback)", max_words=max_words, copied_from=copied_from)
            if output.invalid is None and guard.check(output.text, summary_only=True).used_fallback:
                output = TextOutput("", output.fallback, "empty after the guard")  # only rules or injections
                record("update", invalid=output.invalid)
            fallbacks["update"] += output.fallback is not None
            if output.invalid is not None:
                invalid["update"] += 1
                continue
            proposals.append(output.text)
        return proposals


def _name_of(metric: Any) -> str:
    return getattr(metric, "__qualname__", None) or getattr(metric, "__name__", None) or type(metric).__name__


def _model_of(lm: dspy.LM | None) -> str | None:
    return None if lm is None else str(getattr(lm, "model", lm))
