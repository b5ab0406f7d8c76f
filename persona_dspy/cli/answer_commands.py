"""Commands that answer with PersonaAgent: ``eval`` (every user, LaMP metrics, a JSON report) and ``predict``
(one query of one user, with what was retrieved); each user's compiled program, else the initial persona."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from persona_dspy.cli.arguments import progress_flag
from persona_dspy.cli.errors import CLIError
from persona_dspy.cli.interrupts import INTERRUPTS
from persona_dspy.cli.lm_options import build_task_lm, check_strict, lm_hint
from persona_dspy.cli.task_data import data_folder, ingest_histories, open_memory, programs_dir, task_histories
from persona_dspy.console import plural
from persona_dspy.data.tasks import default_agent_mode

if TYPE_CHECKING:  # imported lazily, so that `--help` and data errors stay fast
    from persona_dspy.data.records import UserHistory
    from persona_dspy.memory.episodic import EpisodicMemory

logger = logging.getLogger(__name__)


def _report_path(args: argparse.Namespace, task: str, mode: str) -> Path:
    if args.out is not None:
        return args.out
    from persona_dspy.files import home

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return home() / "reports" / f"eval-{task}-{mode}-{stamp}.json"


def _program_sources(task: str, histories: list[UserHistory], args: argparse.Namespace, mode: str) -> dict[str, str]:
    """Per user: the compiled program file to answer with, or "initial" (--initial, none saved, another mode)."""
    from persona_dspy.programs import ProgramFileError, find_program, read_program_metadata

    sources = {h.user_id: "initial" for h in histories}
    if args.initial or mode == "none":
        return sources
    folder, other_mode = programs_dir(task, args), []
    for history in histories:
        path = find_program(task, history.user_id, folder)
        if path is None:
            continue
        try:
            saved_mode = read_program_metadata(path)["mode"]
        except ProgramFileError as exc:
            print(f"persona-dspy: warning: {exc}; user {history.user_id} answers with the initial persona",
                  file=sys.stderr)
            continue
        if saved_mode != mode:
            other_mode.append(saved_mode)
            continue
        sources[history.user_id] = str(path)
    if other_mode:
        verb = "is" if len(other_mode) == 1 else "are"
        print(f"persona-dspy: warning: {plural(len(other_mode), 'program')} in {folder} {verb} for mode "
              f"{', '.join(sorted(set(other_mode)))}, not {mode}: those users answer with the initial persona "
              f"(pass --mode {other_mode[0]})", file=sys.stderr)
    return sources


def _agent_factory(task: str, memory: EpisodicMemory | None, sources: dict[str, str], args: argparse.Namespace,
                   mode: str):
    """Each user's agent: their compiled program where ``sources`` names one, else the initial persona."""
    from persona_dspy.agent.semantic_memory import initial_agent
    from persona_dspy.programs import load_program

    def make(history: UserHistory):
        source = sources.get(history.user_id, "initial")
        if source == "initial":
            return initial_agent(history, memory, mode=mode, k=args.k)
        return load_program(source, memory, user_id=history.user_id, task=task)

    return make


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate every user with their compiled program (else the initial persona); table and JSON report."""
    task, histories = task_histories(args)
    mode = args.mode or default_agent_mode(task)
    if args.vs_initial and (args.initial or mode == "none"):
        raise CLIError("--vs-initial compares compiled programs with the initial persona: drop --initial/--mode none")
    lm = build_task_lm(args)  # LM settings are checked before anything heavy is imported
    from persona_dspy.evaluation.evaluate import evaluate

    sources = _program_sources(task, histories, args, mode)
    compiled = sum(source != "initial" for source in sources.values())
    where = programs_dir(task, args)
    print("answering with: " + ("the initial persona (--initial)" if args.initial else
                                "no persona (mode none)" if mode == "none" else
                                f"{plural(compiled, 'compiled program')} from {where}, "
                                f"the initial persona for {plural(len(sources) - compiled, 'other user')}"))
    options = dict(mode=mode, lm=lm, workers=args.workers, k=args.k, progress=progress_flag(args),
                   max_failures=args.max_failures or None)
    memory_cm = open_memory(task, args) if mode != "none" else contextlib.nullcontext(None)
    with memory_cm as memory:  # the baseline (mode none) reads no memory: nothing to ingest
        if memory is not None:
            ingest_histories(memory, histories, args)
        with INTERRUPTS.graceful() as interrupt:
            logger.info("evaluating %s", plural(len(histories), "user"))
            report = evaluate(histories, memory=memory, agent_factory=_agent_factory(task, memory, sources, args, mode),
                              interrupt=interrupt, **options)
            if args.vs_initial and not report.interrupted:
                logger.info("evaluating the same users with the initial persona (--vs-initial)")
                initial = {h.user_id: "initial" for h in histories}
                baseline = evaluate(histories, memory=memory, interrupt=interrupt,
                                    agent_factory=_agent_factory(task, memory, initial, args, mode), **options)
                report.vs_initial = {"overall": baseline.overall, "per_user": baseline.per_user,
                                     "calls": baseline.calls, "failures": [f.user_id for f in baseline.failures]}
                report.interrupted = baseline.interrupted
    report.agents = sources
    report.dataset = {"path": str(data_folder(task, args)), "split": args.split}
    print(report.summary_table())
    path = report.to_json(_report_path(args, task, mode))
    print(f"report: {path}")
    if report.interrupted:
        print(f"persona-dspy: interrupted: the report covers the {plural(len(report.per_user), 'user')} that "
              "completed", file=sys.stderr)
        return INTERRUPTS.exit_code
    if report.n_scored == 0:
        first = report.failures[0] if report.failures else None
        cause = f"; first: user {first.user_id} at {first.stage}: {first.error_type}: {first.error}" if first else ""
        raise CLIError(f"no user could be evaluated ({len(report.failures)} failed, {len(report.skipped_users)} "
                       f"skipped){cause}{lm_hint(lm, first.error if first else '')}")
    check_strict(report.output_totals, args)
    if not report.complete:
        print(f"persona-dspy: warning: {plural(len(report.failures), 'user')} failed and "
              f"{len(report.skipped_users)} skipped; the metrics cover the other "
              f"{plural(len(report.per_user), 'user')} only", file=sys.stderr)
        return 1
    return 0


def _find_user(histories: list[UserHistory], user_id: str) -> UserHistory:
    from persona_dspy.data.records import select_users

    return select_users(histories, [user_id])[0]


def _predict_program(task: str, user_id: str, args: argparse.Namespace) -> tuple[Path | None, str]:
    """The program file predict answers with (None: the initial persona) and a line saying which and why."""
    from persona_dspy.programs import ProgramFileError, find_program, read_program_metadata

    if args.program is not None:
        return args.program, f"{args.program} (--program)"
    if args.initial:
        return None, "none: the initial persona (--initial)"
    if args.mode == "none":
        return None, "none: mode none answers without a persona"
    folder = programs_dir(task, args)
    path = find_program(task, user_id, folder)
    if path is None:
        return None, f"none: the initial persona (no compiled program for this user in {folder})"
    try:
        metadata = read_program_metadata(path)
    except ProgramFileError as exc:
        print(f"persona-dspy: warning: {exc}; answering with the initial persona", file=sys.stderr)
        return None, f"none: the initial persona ({path} is unreadable)"
    if args.mode is not None and metadata["mode"] != args.mode:
        return None, f"none: the initial persona ({path} is a {metadata['mode']} program, --mode is {args.mode})"
    return path, f"{path} (compiled {metadata['created']}, LM {(metadata.get('lm') or {}).get('model')})"


def cmd_predict(args: argparse.Namespace) -> int:
    """Answer one query of one user and show what the agent retrieved: a look at single cases."""
    task, histories = task_histories(args)
    history = _find_user(histories, args.user)
    if args.query_id is not None and args.query_id not in {str(q.id) for q in history.queries}:
        raise CLIError(f"user {history.user_id!r} has no query {args.query_id!r}; their queries: "
                       f"{', '.join(str(q.id) for q in history.queries) or 'none'}")
    if args.text is not None and not args.text.strip():
        raise CLIError("--text is empty")
    import dspy
    from dspy.utils.exceptions import LMError

    from persona_dspy.agent.semantic_memory import initial_agent
    from persona_dspy.data.examples import query_examples
    from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
    from persona_dspy.lm.adapters import default_adapter
    from persona_dspy.lm.report import describe_lm, is_offline
    from persona_dspy.lm.usage import LMUsage

    program, used = _predict_program(task, history.user_id, args)
    mode = args.mode or default_agent_mode(task)
    gold = None
    if args.query_id is not None:
        example = {str(e.example_id): e for e in query_examples(history)}[args.query_id]
        query, scope, gold = example.query, example.scope, example.answer
        where = f"query {args.query_id} (its own profile: {len(scope.within_ids or ())} items)"
    else:
        query, scope, where = args.text, None, "free text (the user's whole memory)"

    lm = build_task_lm(args)
    usage = LMUsage()

    def answer(memory: EpisodicMemory | None) -> dspy.Prediction:
        nonlocal mode
        with dspy.context(lm=lm, adapter=default_adapter()), usage.counting():
            if program is not None:
                from persona_dspy.programs import load_program

                agent = load_program(program, memory, user_id=history.user_id, task=task)
                mode = agent.mode
            else:
                agent = initial_agent(history, memory, mode=mode, k=args.k)
            return agent(query=query, scope=scope)

    try:
        if mode == "none" and program is None:
            prediction = answer(None)
        else:
            with open_memory(task, args) as memory:
                memory.add_histories([history])
                prediction = answer(memory)
    except LMError as exc:
        raise CLIError(f"the LM call failed: {exc}{lm_hint(lm, exc)}") from exc

    print(f"task: {task}  user: {history.user_id}  mode: {mode}  lm: {describe_lm(lm)['model']}")
    print(f"program: {used}")
    if is_offline(lm):
        print(f"NOTE: {OFFLINE_NOTE}")
    print(f"query: {where}")
    print(f"answer: {prediction.answer}" + (f"  (INVALID: {prediction.invalid})"
                                            if getattr(prediction, "invalid", None) else ""))
    print(f"raw answer: {prediction.raw_answer}")
    if gold is not None:
        print(f"gold: {gold}")
    passages = list(prediction.passages or [])
    if mode in ("rag", "demos"):
        shown = "as demonstrations, most similar last" if mode == "demos" else "as context"
        print(f"retrieved passages ({len(passages)}, {shown}):")
        for i, passage in enumerate(passages, 1):
            print(f"  {i}. {passage.render()}  [item {passage.item_id}, score {passage.score:.3f}]")
    elif mode == "react":
        print("retrieved passages: none up front (react searches memory through its tool while reasoning)")
    else:
        print("retrieved passages: none (mode none reads no memory)")
    snap = usage.snapshot()
    print(f"LM calls: {snap['calls']}, tokens: {snap['total_tokens']}")
    return 0
