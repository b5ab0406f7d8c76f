"""The ``persona-dspy`` command line.

Commands: ``ingest`` (a dataset into per-user memory), ``memory copy`` (between stores), ``retrieval-eval`` (how
well memory alone predicts),
``eval`` (PersonaAgent over a dataset, LaMP metrics, a JSON report), ``predict`` (one query of one user) and
``compile`` (align every user's persona and save their program files), ``compare`` (the aligner against DSPy's
optimizers), ``tune`` (search the aligner's settings with Optuna), ``users`` (what exists per user: data, memory,
program) and ``memory`` (delete or rebuild users' stored memory).
Every failure the user can fix is reported as ``persona-dspy: error: ...`` on stderr with exit code 2, no
traceback; ``eval`` and ``compile`` exit 1 when some (not all) users failed. Ctrl-C or SIGTERM exits 130: ``eval``
and ``compile`` first stop starting users, give those in flight a few seconds and write what completed; a second
Ctrl-C exits at once.

Start-up stays fast: this module and everything a usage, data or task error needs import no dspy, litellm, qdrant,
fastembed or llama.cpp (a test checks it); each command imports what it uses, after the data has been read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_dspy import __version__, plural

if TYPE_CHECKING:  # the CLI imports dspy and friends lazily, so that `--help` and data errors stay fast
    import dspy

    from persona_dspy.data.records import UserHistory
    from persona_dspy.memory.episodic import EpisodicMemory

logger = logging.getLogger(__name__)

SHIPPED_TASKS = ("LaMP_2N", "LaMP_3", "LaMP_2M")
MODES = ("rag", "react", "none")
DEFAULT_OPTIMIZERS = ("initial", "non_personalized", "persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot")


class CLIError(Exception):
    """A problem the user can fix; reported on one line, without a traceback."""


def _add_data_args(parser: argparse.ArgumentParser, single_task: bool = False) -> None:
    if single_task:
        parser.add_argument("--task", required=True,
                            help=f"LaMP task, e.g. one of the shipped samples ({', '.join(SHIPPED_TASKS)})")
    else:
        parser.add_argument("--task", default="all",
                            help=f"LaMP task of a shipped sample ({', '.join(SHIPPED_TASKS)}) or 'all' (default)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder in LaMP layout ({split}_questions.json + {split}_outputs.json); "
                             "default: the sample shipped with the package")
    parser.add_argument("--split", default="dev", help="file prefix inside --data (default: dev)")


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", default=None,
                        help="memory folder (Qdrant Edge), ':memory:' (temporary); default $PERSONA_DSPY_HOME/memory")
    parser.add_argument("--qdrant-url", default=os.environ.get("PERSONA_DSPY_QDRANT_URL"),
                        help="a Qdrant server instead of a local folder (env PERSONA_DSPY_QDRANT_URL)")
    parser.add_argument("--dense", default=os.environ.get("PERSONA_DSPY_DENSE_MODEL"),
                        help="dense embedding model: a fastembed model name or a local ONNX folder, for hybrid "
                             "retrieval (env PERSONA_DSPY_DENSE_MODEL); default: BM25 only")


def _add_lm_args(parser: argparse.ArgumentParser, temperature: bool = True) -> None:
    """The task LM's flags; ``temperature=False`` for commands that set it themselves (tune searches it)."""
    parser.add_argument("--lm", default=None,
                        help="'local' (default: embedded llama.cpp serving SmolLM2-135M-Instruct, fetched once), "
                             "local/<path.gguf>, openai/<model> or hosted_vllm/<model> with --api-base, "
                             "ollama_chat/<model>, or 'offline' (the stand-in: a plumbing check, never a model); "
                             "env PERSONA_DSPY_LM")
    parser.add_argument("--api-base", default=None,
                        help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (env PERSONA_DSPY_API_BASE)")
    parser.add_argument("--api-key", default=None,
                        help="API key (prefer env PERSONA_DSPY_API_KEY: command lines end up in shell history)")
    if temperature:
        parser.add_argument("--temperature", type=_non_negative_float, default=0.0,
                            help="sampling temperature (default 0)")
    parser.add_argument("--max-tokens", type=_positive(int), default=512,
                        help="completion token cap per call (default 512)")
    parser.add_argument("--timeout", type=_positive(float), default=None,
                        help="seconds per LM request (default 60; 600 for the embedded model, whose requests queue "
                             "for one CPU)")
    parser.add_argument("--retries", type=_non_negative, default=3,
                        help="retries of a failed LM request, with backoff (default 3)")
    parser.add_argument("--context-tokens", type=_positive(int), default=None,
                        help="the model's context size in tokens, for a server that does not report it (llama.cpp "
                             "reports it at /props, vLLM at /v1/models); prompts are fitted to it")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when most of the model's outputs were invalid, instead of a warning")
    parser.add_argument("--max-in-flight", type=_positive(int), default=None, metavar="N",
                        help="with several servers in --api-base (URL,URL,... or a file of URLs): calls in flight "
                             "per server (default 16)")
    _add_server_args(parser)


def _add_server_args(parser: argparse.ArgumentParser, slots_default: str = "--workers") -> None:
    """How the embedded llama.cpp server runs (--lm local and `serve`)."""
    group = parser.add_argument_group("embedded model server (--lm local)")
    group.add_argument("--server-slots", type=_positive(int), default=None,
                       help=f"parallel slots (default: {slots_default})")
    group.add_argument("--server-threads", type=_positive(int), default=None,
                       help="llama.cpp threads (default: cores - 1, at least 1; 2 is faster on an idle 2-core machine)")
    group.add_argument("--server-context", type=_positive(int), default=None,
                       help="context tokens per slot (default 8192, SmolLM2's own)")
    group.add_argument("--server-port", type=_non_negative, default=None, help="port on 127.0.0.1 (default: free)")
    group.add_argument("--gpu-layers", type=int, default=None, help="layers offloaded to a GPU build (default 0)")
    group.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", default=None,
                       help="recompute every prompt: slower, but a prompt sent twice at temperature 0 gets the same "
                            "answer (llama.cpp's reused prompt cache can change one)")


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The embedded server's settings from the flags; slots default to the command's workers."""
    slots = args.server_slots or getattr(args, "workers", None) or 1
    options = {"slots": slots, "threads": args.server_threads, "context_per_slot": args.server_context,
               "port": args.server_port, "gpu_layers": args.gpu_layers, "prompt_cache": args.prompt_cache}
    return {key: value for key, value in options.items() if value is not None}


def _add_optimizer_lm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer-lm", default=None,
                        help="a separate LM for textual loss, persona updates and reflection "
                             "(env PERSONA_DSPY_OPTIMIZER_LM; default: the task LM)")
    parser.add_argument("--optimizer-api-base", default=None, help="its server (env PERSONA_DSPY_OPTIMIZER_API_BASE)")


def _add_user_args(parser: argparse.ArgumentParser) -> None:
    """The same user selection on every per-user command."""
    parser.add_argument("--users", nargs="+", default=None, metavar="ID", help="only these user ids")
    parser.add_argument("--max-users", type=_positive(int), default=None, metavar="N",
                        help="at most N users (the first in dataset order)")


def _add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """The one progress rule: bars on stderr when it is a terminal, unless --progress or --no-progress says."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a terminal)")


def _progress(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "quiet", False) and args.progress is None else args.progress


def _verbosity_parent() -> argparse.ArgumentParser:
    """-v/-q accepted after the subcommand too (SUPPRESS: an absent flag does not undo one given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log each stage (-vv: debug)")
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="errors only: no warnings, no progress bars")
    return parent


def _selected(histories: list[UserHistory], args: argparse.Namespace) -> list[UserHistory]:
    from persona_dspy.data.records import select_users

    return select_users(histories, args.users, args.max_users)


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _tasks(args: argparse.Namespace) -> list[str]:
    from persona_dspy.data.tasks import normalize_task_name

    if args.task == "all":
        if args.data is not None:
            raise CLIError("--data needs a single --task")
        return list(SHIPPED_TASKS)
    return [normalize_task_name(args.task)]


def _command(sub: Any, name: str, help: str, *, temperature: bool = True) -> argparse.ArgumentParser:
    """A command that answers with an LM on one task's data and memory: the flags they all share."""
    parser = _subcommand(sub, name, help)
    _add_data_args(parser, single_task=True)
    _add_memory_args(parser)
    _add_lm_args(parser, temperature=temperature)
    return parser


def _subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, parents=[_verbosity_parent()])


def _data_folder(task: str, args: argparse.Namespace) -> Path:
    from persona_dspy.data.lamp import dataset_dir

    return args.data if args.data is not None else dataset_dir(task)


def _load(task: str, args: argparse.Namespace):
    from persona_dspy.data.lamp import load_dataset

    folder = _data_folder(task, args)
    histories = load_dataset(folder, split=args.split)
    if histories and task != "LaMP_2" and histories[0].task != task:
        raise ValueError(f"{folder} holds {histories[0].task}, not {task}")
    return histories


def _open_memory(task: str, args: argparse.Namespace):
    from persona_dspy.memory.embeddings import EmbeddingConfig
    from persona_dspy.memory.episodic import EpisodicMemory

    config = EmbeddingConfig(sparse=True, dense=args.dense)
    if args.qdrant_url:
        return EpisodicMemory.for_task(task, url=args.qdrant_url, embedding=config)
    return EpisodicMemory.for_task(task, args.memory, embedding=config)


def _ingest(memory: EpisodicMemory, histories: list[UserHistory], args: argparse.Namespace) -> int:
    """Store the users' histories, a bar step per user (idempotent: items already stored as they are cost nothing)."""
    from persona_dspy import progress_bar

    task = histories[0].task if histories else "memory"
    logger.info("ingesting %s into %s (%s)", plural(len(histories), "user"), memory.location,
                memory.embedder.config.label)
    written = 0
    with progress_bar(len(histories), f"ingest {task}", _progress(args)) as bar:
        for history in histories:
            written += memory.add_histories([history])
            bar.update(1)
    logger.info("ingested: %s written", plural(written, "item"))
    return written


def cmd_ingest(args: argparse.Namespace) -> int:
    for task in _tasks(args):
        histories = _selected(_load(task, args), args)
        with _open_memory(task, args) as memory:
            written = _ingest(memory, histories, args)
            print(f"{task}: {plural(len(histories), 'user')}, {plural(written, 'item')} written, "
                  f"{memory.count()} stored at {memory.location} ({memory.embedder.config.label}, {memory.layout})")
    return 0


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    """Ingest (idempotent) and print how well a k-nearest vote over each query's own profile does."""
    from persona_dspy.evaluation.retrieval_quality import evaluate_retrieval

    rows = []
    for task in _tasks(args):
        histories = _selected(_load(task, args), args)
        with _open_memory(task, args) as memory:
            _ingest(memory, histories, args)
            strategies = ["recency", "majority", "bm25"] + (["dense", "hybrid"] if memory.embedder.has_dense else [])
            for strategy in strategies:
                logger.info("%s: scoring %s retrieval", task, strategy)
                rows.append(evaluate_retrieval(histories, strategy, k=args.k, memory=memory).as_row())
    from persona_dspy.evaluation.tables import format_table

    print(format_table(rows, ["task", "strategy", "k", "queries", "accuracy", "mae", "rmse", "fallbacks"], digits=4))
    if args.json:
        from persona_dspy.files import write_atomically

        write_atomically(args.json, json.dumps(rows, indent=2).encode("utf-8"))
    return 0


def cmd_memory_copy(args: argparse.Namespace) -> int:
    from persona_dspy.memory.episodic import close_store
    from persona_dspy.memory.transfer import LegacyLocalStore, copy_memories, open_any, retire_legacy_layout

    source = open_any(args.source, api_key=args.api_key)
    try:
        same = Path(args.source).expanduser().resolve() == Path(args.target).expanduser().resolve()
        if same and not isinstance(source, LegacyLocalStore):
            raise CLIError("--from and --to are the same store; only an old local-mode folder migrates in place")
        target = open_any(args.target, target=True, api_key=args.api_key)
        try:
            report = copy_memories(source, target, args.namespace, args.batch_size,
                                   progress=(lambda line: print(line, file=sys.stderr)) if args.verbose else None)
            for namespace, stats in report.namespaces.items():
                print(f"{namespace}: {stats['users']} users, {stats['written']} points written, "
                      f"{stats['unchanged']} already there; counts match ({target.count(namespace)} in {args.target})")
        finally:
            close_store(target)
    finally:
        close_store(source)
    if same:
        print(f"old local-mode files moved to {retire_legacy_layout(Path(args.source).expanduser())}")
    return 0


def _build_lm(args: argparse.Namespace) -> dspy.LM:
    """The LM the flags (or PERSONA_DSPY_* variables) name, else the embedded local model; built before any call."""
    from persona_dspy.lm.build import build_lm

    logger.info("building the LM (%s)", args.lm or os.environ.get("PERSONA_DSPY_LM") or "local: starts the model")
    lm = build_lm(args.lm, args.api_base, api_key=args.api_key, temperature=getattr(args, "temperature", 0.0),
                  max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries,
                  server=_server_options(args), max_in_flight=args.max_in_flight)
    if lm.kwargs.get("api_base"):
        import litellm

        litellm.suppress_debug_info = True  # its "Give Feedback / Get Help" banner is noise next to our one-line errors
    from persona_dspy.lm.server_fit import fit_to_server

    fit_to_server(lm, args)
    return lm


def _build_optimizer_lm(args: argparse.Namespace, task_lm: dspy.LM) -> dspy.LM:
    """The LM for loss, updates and reflection: --optimizer-lm (or its env variable), else the task LM itself."""
    from persona_dspy.lm.build import build_optimizer_lm

    return build_optimizer_lm(args.optimizer_lm, args.optimizer_api_base, task_lm=task_lm,
                              temperature=getattr(args, "temperature", 0.0), max_tokens=args.max_tokens,
                              timeout=args.timeout, num_retries=args.retries, server=_server_options(args))


def _lm_hint(lm: dspy.LM, error: object = "") -> str:
    """What the error says happened at the server (refused, timed out while busy, context overflow...)."""
    from persona_dspy.lm.server_fit import explain_lm_error

    return explain_lm_error(str(error), lm)


def _strict(totals: dict[str, Any], args: argparse.Namespace) -> None:
    """``--strict``: a run whose outputs were mostly invalid is an error (exit 2), not a result."""
    from persona_dspy.evaluation.output_counts import strict_failure

    message = strict_failure(totals, getattr(args, "strict", False))
    if message:
        raise CLIError(message)


def _task_histories(args: argparse.Namespace) -> tuple[str, list[UserHistory]]:
    """One task's users: the task name (LaMP_2 resolved from the data) and its histories, selected by the flags.

    Read before any LM is built, so that a data error costs no model start and imports nothing heavy.
    """
    from persona_dspy.data.tasks import normalize_task_name

    task = normalize_task_name(args.task)
    logger.info("reading the %s data from %s", task, _data_folder(task, args))
    histories = _load(task, args)
    if not histories:
        raise CLIError(f"no users in the {task} data")
    if hasattr(args, "max_users"):
        histories = _selected(histories, args)
    return histories[0].task, histories


def _report_path(args: argparse.Namespace, task: str, mode: str) -> Path:
    if args.out is not None:
        return args.out
    from persona_dspy import home

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return home() / "reports" / f"eval-{task}-{mode}-{stamp}.json"


def _programs_dir(task: str, args: argparse.Namespace) -> Path:
    from persona_dspy.programs import default_programs_dir

    return args.programs if args.programs is not None else default_programs_dir(task)


def _program_sources(task: str, histories: list[UserHistory], args: argparse.Namespace, mode: str) -> dict[str, str]:
    """Per user: the compiled program file to answer with, or "initial" (--initial, none saved, another mode)."""
    from persona_dspy.programs import ProgramFileError, find_program, read_program_metadata

    sources = {h.user_id: "initial" for h in histories}
    if args.initial or mode == "none":
        return sources
    folder, other_mode = _programs_dir(task, args), []
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
    task, histories = _task_histories(args)
    mode = args.mode or "rag"
    if args.vs_initial and (args.initial or mode == "none"):
        raise CLIError("--vs-initial compares compiled programs with the initial persona: drop --initial/--mode none")
    lm = _build_lm(args)  # LM settings are checked before anything heavy is imported
    from persona_dspy.evaluation.evaluate import evaluate

    sources = _program_sources(task, histories, args, mode)
    compiled = sum(source != "initial" for source in sources.values())
    where = _programs_dir(task, args)
    print("answering with: " + ("the initial persona (--initial)" if args.initial else
                                "no persona (mode none)" if mode == "none" else
                                f"{plural(compiled, 'compiled program')} from {where}, "
                                f"the initial persona for {plural(len(sources) - compiled, 'other user')}"))
    options = dict(mode=mode, lm=lm, workers=args.workers, k=args.k, progress=_progress(args),
                   max_failures=args.max_failures or None)
    memory_cm = _open_memory(task, args) if mode != "none" else contextlib.nullcontext(None)
    with memory_cm as memory:  # the baseline (mode none) reads no memory: nothing to ingest
        if memory is not None:
            _ingest(memory, histories, args)
        with _INTERRUPTS.graceful() as interrupt:
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
    report.dataset = {"path": str(_data_folder(task, args)), "split": args.split}
    print(report.summary_table())
    path = report.to_json(_report_path(args, task, mode))
    print(f"report: {path}")
    if report.interrupted:
        print(f"persona-dspy: interrupted: the report covers the {plural(len(report.per_user), 'user')} that "
              "completed", file=sys.stderr)
        return 130
    if report.n_scored == 0:
        first = report.failures[0] if report.failures else None
        cause = f"; first: user {first.user_id} at {first.stage}: {first.error_type}: {first.error}" if first else ""
        raise CLIError(f"no user could be evaluated ({len(report.failures)} failed, {len(report.skipped_users)} "
                       f"skipped){cause}{_lm_hint(lm, first.error if first else '')}")
    _strict(report.output_totals, args)
    if not report.complete:
        print(f"persona-dspy: warning: {plural(len(report.failures), 'user')} failed and "
              f"{len(report.skipped_users)} skipped; the metrics cover the other "
              f"{plural(len(report.per_user), 'user')} only", file=sys.stderr)
        return 1
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Align users' personas on their recent interactions and save one program file per user (resumable)."""
    task, histories = _task_histories(args)  # data and user errors first: they import nothing heavy
    from persona_dspy.files import check_writable_dir
    from persona_dspy.programs import default_programs_dir

    out = args.out if args.out is not None else default_programs_dir(task)
    check_writable_dir(out)  # before the model server, the ingest and any call; compile_users checks the space too
    if args.ray is not None:  # the only place Ray enters: without --ray it is never imported
        lm, summary = _compile_on_ray(args, task, histories, out)
    else:
        lm = _build_lm(args)
        optimizer_lm = _build_optimizer_lm(args, lm)
        from persona_dspy.jobs.compile import compile_users
        with _open_memory(task, args) as memory:
            _ingest(memory, histories, args)
            with _INTERRUPTS.graceful() as interrupt:
                logger.info("compiling %s into %s", plural(len(histories), "user"), out)
                summary = compile_users(
                    histories, memory=memory, out_dir=out, lm=lm, optimizer_lm=optimizer_lm, mode=args.mode,
                    k=args.k, n_recent=args.recent, workers=args.workers, force=args.force, progress=_progress(args),
                    interrupt=interrupt, **_aligner_flags(args),
                )
    from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
    from persona_dspy.lm.build import is_offline
    print(summary.table())
    if is_offline(lm):
        print(f"NOTE: {OFFLINE_NOTE}")
    print(f"programs: {out}")
    if summary.interrupted:
        print(f"persona-dspy: interrupted: {plural(len(summary.results), 'user')} done and recorded; rerun the same "
              "command to continue", file=sys.stderr)
        return 130
    failed = summary.count("failed")
    if failed and failed == len(summary.results):
        first = summary.results[0].error
        raise CLIError(f"no user could be compiled; first: {first}{_lm_hint(lm, first)}")
    _strict(summary.output_totals(), args)
    if summary.summary_error:
        print(f"persona-dspy: warning: {summary.summary_error}", file=sys.stderr)
    return 1 if failed or summary.summary_error else 0


def _aligner_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"batch_size": args.batch_size, "iterations": args.iterations, "candidates_per_step": args.candidates,
            "max_persona_words": args.max_persona_words}


def _compile_on_ray(args: argparse.Namespace, task: str, histories: list[UserHistory], out: Path):
    """``compile --ray``: workers build the LMs and open the memory from these settings (``jobs.distributed``)."""
    from persona_dspy.jobs.distributed import LMSpec, MemorySpec, compile_on_ray
    from persona_dspy.lm.build import LOCAL, is_local
    from persona_dspy.lm.pool import server_list

    model = args.lm or os.environ.get("PERSONA_DSPY_LM")
    if is_local((model or "").strip() or LOCAL):
        raise CLIError("--ray needs a model server every worker can reach (--lm <model> --api-base URL[,URL...], "
                       "e.g. `persona-dspy serve` for the local model) or --lm offline: the embedded model would "
                       "start one server per worker process")
    servers = server_list(args.api_base or os.environ.get("PERSONA_DSPY_API_BASE"))  # a file is read here, once
    options = {"temperature": args.temperature, "max_tokens": args.max_tokens, "timeout": args.timeout,
               "num_retries": args.retries, "max_in_flight": args.max_in_flight}
    lm = LMSpec(model, ",".join(servers) if servers else None, args.api_key,
                {key: value for key, value in options.items() if value is not None})
    optimizer = None
    if args.optimizer_lm or os.environ.get("PERSONA_DSPY_OPTIMIZER_LM"):
        bases = server_list(args.optimizer_api_base or os.environ.get("PERSONA_DSPY_OPTIMIZER_API_BASE"))
        optimizer = LMSpec(args.optimizer_lm or os.environ.get("PERSONA_DSPY_OPTIMIZER_LM"),
                           ",".join(bases) if bases else None, os.environ.get("PERSONA_DSPY_OPTIMIZER_API_KEY"),
                           lm.options)
    memory = MemorySpec(task, None if args.qdrant_url else str(args.memory or _default_memory()), args.qdrant_url,
                        os.environ.get("PERSONA_DSPY_QDRANT_API_KEY"), args.dense)
    with _INTERRUPTS.graceful() as interrupt:
        logger.info("compiling %s into %s on Ray (%s)", plural(len(histories), "user"), out, args.ray)
        summary = compile_on_ray(histories, out_dir=out, lm=lm, memory=memory, optimizer_lm=optimizer,
                                 address=args.ray, processes=args.ray_processes, threads=args.workers,
                                 batch=args.ray_batch, mode=args.mode, k=args.k, n_recent=args.recent,
                                 force=args.force, progress=_progress(args), interrupt=interrupt,
                                 **_aligner_flags(args))
    return lm.build(), summary


def _default_memory() -> Path:
    from persona_dspy.memory.episodic import default_memory_path

    return default_memory_path()


SETTINGS_FLAGS = {"batch_size": "batch_size", "iterations": "iterations", "k": "k", "temperature": "temperature",
                  "candidates_per_step": "candidates", "max_persona_words": "max_persona_words",
                  "n_recent": "recent", "recent": "recent", "mode": "mode"}
"""Keys a ``compile --settings`` file may hold (tune's ``best_settings``, or written by hand) -> compile's flags."""


def _settings_defaults(path: Path, task: str | None) -> dict[str, Any]:
    """compile's flag defaults from a settings file: ``tune --out``'s summary (its best settings) or a flat object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"--settings {path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CLIError(f"--settings {path}: expected a JSON object")
    if "best_settings" in document:  # a `tune --out` summary
        if not document["best_settings"]:
            raise CLIError(f"--settings {path}: the study has no best settings ({document.get('no_best_reason')})")
        from persona_dspy.data.tasks import canonical_task_name

        if task and document.get("task") and document["task"] != (canonical_task_name(task) or task):
            logger.warning("--settings %s were tuned on %s, not %s", path, document["task"], task)
        settings = {**document["best_settings"], **(document.get("compile_settings") or {})}
    else:
        settings = document
    unknown = sorted(set(settings) - set(SETTINGS_FLAGS))
    if unknown:
        raise CLIError(f"--settings {path}: unknown setting(s) {', '.join(unknown)}; "
                       f"known: {', '.join(SETTINGS_FLAGS)}")
    checks = {"temperature": _non_negative_float, "iterations": _non_negative, "mode": str}
    defaults = {}
    for key, value in settings.items():
        flag = SETTINGS_FLAGS[key]
        try:
            defaults[flag] = checks.get(flag, _positive(int))(str(value))
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"--settings {path}: {key}: {exc}") from exc
    if defaults.get("mode", "rag") not in ("rag", "react"):
        raise CLIError(f"--settings {path}: mode must be rag or react, got {defaults['mode']!r}")
    return defaults


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every optimizer on the same users, trainsets and validation slices; write JSON and CSV."""
    from persona_dspy import home

    task, histories = _task_histories(args)
    lm = _build_lm(args)
    optimizer_lm = _build_optimizer_lm(args, lm)
    from persona_dspy.jobs.comparison import compare_optimizers

    out = args.out if args.out is not None else home() / "reports" / f"compare-{task}"
    with _open_memory(task, args) as memory:
        _ingest(memory, histories, args)
        logger.info("comparing %s on %s", plural(len(args.optimizers), "optimizer"), plural(len(histories), "user"))
        report = compare_optimizers(histories, memory=memory, lm=lm, optimizer_lm=optimizer_lm,
                                    optimizers=tuple(args.optimizers), n_recent=args.recent, k=args.k,
                                    seed=args.seed, progress=_progress(args))
    print(report.table())
    for kind, path in report.save(out).items():
        print(f"{kind}: {path}")
    _strict(report.output_totals, args)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the aligner's settings on dev users with Optuna (SQLite study, resumable)."""
    from persona_dspy import home

    task, histories = _task_histories(args)
    # Built here only to check the flags before the study starts (nothing is sent): each trial builds its own LM
    # at the trial's temperature.
    _build_optimizer_lm(args, _build_lm(args))
    import optuna

    from persona_dspy.files import write_atomically
    from persona_dspy.jobs.tuning import run_tuning

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one log line per trial is noise next to the summary
    storage = args.storage or f"sqlite:///{home() / 'tuning.db'}"
    with _open_memory(task, args) as memory:
        _ingest(memory, histories, args)
        logger.info("tuning: %s in %s", plural(args.n_trials, "trial"), storage)
        summary = run_tuning(
            task, histories, memory, lm_model=args.lm, api_base=args.api_base, api_key=args.api_key,
            optimizer_lm_model=args.optimizer_lm, optimizer_api_base=args.optimizer_api_base, storage=storage,
            study_name=args.study_name or f"tune-{task}-{args.mode}", n_trials=args.n_trials,
            max_lm_calls_per_user=args.max_calls_per_user, multi_objective=args.multi_objective,
            algorithm=args.sampler, seed=args.seed, n_recent=args.recent, mode=args.mode, workers=args.workers,
            max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries, progress=_progress(args),
            server=_server_options(args),
        )
    summary["compile_settings"] = {"mode": args.mode, "n_recent": args.recent}  # what `compile --settings` also needs
    print(f"{task}: {plural(summary['trials_done'], 'trial')} done ({summary['trials_failed']} failed) in {storage}")
    if summary.get("note"):
        print(f"NOTE: {summary['note']}")
    if summary.get("no_best_reason"):
        print(f"no best settings: {summary['no_best_reason']}")
    else:
        print(f"best settings: {json.dumps(summary['best_settings'])}")
        print(f"best {summary['metric']}: {summary['best_metric_value']}  "
              f"LM calls per user: {summary['lm_calls_per_user']}")
    from persona_dspy.evaluation.output_counts import counts_line, invalid_warning

    print(counts_line(summary["output_totals"]))
    if invalid_warning(summary["output_totals"]):
        print(f"WARNING: {invalid_warning(summary['output_totals'])}")
    if args.out is not None:
        write_atomically(args.out, (json.dumps(summary, indent=2, default=str) + "\n").encode("utf-8"))
        print(f"summary: {args.out}")
        if not summary.get("no_best_reason"):
            print(f"to compile with these settings: persona-dspy compile --task {task} --settings {args.out}")
    _strict(summary["output_totals"], args)
    return 1 if summary.get("no_best_reason") else 0


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
    folder = _programs_dir(task, args)
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
    task, histories = _task_histories(args)
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
    from persona_dspy.lm.build import LMUsage, describe_lm, is_offline

    program, used = _predict_program(task, history.user_id, args)
    mode = args.mode or "rag"
    gold = None
    if args.query_id is not None:
        example = {str(e.example_id): e for e in query_examples(history)}[args.query_id]
        query, scope, gold = example.query, example.scope, example.answer
        where = f"query {args.query_id} (its own profile: {len(scope.within_ids or ())} items)"
    else:
        query, scope, where = args.text, None, "free text (the user's whole memory)"

    lm = _build_lm(args)
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
            with _open_memory(task, args) as memory:
                memory.add_histories([history])
                prediction = answer(memory)
    except LMError as exc:
        raise CLIError(f"the LM call failed: {exc}{_lm_hint(lm, exc)}") from exc

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
    if mode == "rag":
        print(f"retrieved passages ({len(passages)}):")
        for i, passage in enumerate(passages, 1):
            print(f"  {i}. {passage.render()}  [item {passage.item_id}, score {passage.score:.3f}]")
    elif mode == "react":
        print("retrieved passages: none up front (react searches memory through its tool while reasoning)")
    else:
        print("retrieved passages: none (mode none reads no memory)")
    snap = usage.snapshot()
    print(f"LM calls: {snap['calls']}, tokens: {snap['total_tokens']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the embedded llama.cpp server in the foreground, for other processes or a notebook to share."""
    import signal
    import threading

    from persona_dspy.lm.local_server import LocalServer, ServerSettings
    from persona_dspy.lm.models import resolve_model

    settings = ServerSettings(resolve_model(args.model), **{"port": 8080, **_server_options(args)})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalServer(settings) as server:
        props = server.props()
        print(f"serving {settings.model_path.name} at {server.api_base} ({props.get('total_slots')} slots, "
              f"{props.get('default_generation_settings', {}).get('n_ctx')} context tokens per slot)")
        print(f"use it with: --lm openai/local --api-base {server.api_base}   (Ctrl-C stops it)", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    print("stopped")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List, fetch or remove cached model files."""
    from persona_dspy.lm.models import KNOWN_MODELS, cached_models, fetch_model, models_dir, remove_model

    if args.action == "fetch":
        names = args.names or [next(iter(KNOWN_MODELS))]
        unknown = [name for name in names if name not in KNOWN_MODELS]
        if unknown:
            raise CLIError(f"unknown model {unknown[0]!r}; known: {', '.join(KNOWN_MODELS)}")
        for name in names:
            print(f"{name}: {fetch_model(KNOWN_MODELS[name])}")
    elif args.action == "remove":
        if not args.names:
            raise CLIError("name the model(s) to remove (see `persona-dspy models list`)")
        for name in args.names:
            print(f"removed {remove_model(name)}")
    else:
        cached = {model.name: model for model in cached_models(verify=args.verify)}
        print(f"model cache: {models_dir()}")
        for name, known in KNOWN_MODELS.items():
            entry = cached.pop(name, None)
            state = "not fetched" if entry is None else f"cached, {entry.size / 1e6:.0f} MB" + (
                "" if entry.verified is None else (", SHA-256 ok" if entry.verified else ", SHA-256 MISMATCH"))
            print(f"  {name}: {state} ({known.license}; {known.description})")
        for entry in cached.values():
            print(f"  {entry.path.name}: cached, {entry.size / 1e6:.0f} MB (not a known model)")
    return 0


def _memory_location(task: str, args: argparse.Namespace) -> str | None:
    """Where the task's memory is, or None when there is none yet (so that looking never creates one)."""
    if args.qdrant_url:
        return args.qdrant_url
    if args.memory == ":memory:":
        return None
    from persona_dspy import home

    folder = Path(args.memory).expanduser() if args.memory else home() / "memory"
    return str(folder) if folder.exists() else None


def _program_row(path: Path) -> dict[str, Any]:
    from persona_dspy.programs import ProgramFileError, read_program_metadata

    try:
        metadata = read_program_metadata(path)
    except ProgramFileError as exc:
        return {"path": str(path), "error": exc.problem}
    scores = metadata.get("dev_scores") or {}
    return {"path": str(path), "persona_words": len(metadata["persona"].split()), "aligned": metadata["created"],
            "lm": (metadata.get("lm") or {}).get("model"), "mode": metadata["mode"],
            "dev_score": scores.get("best"), "dev_score_start": scores.get("start")}


def cmd_users(args: argparse.Namespace) -> int:
    """Every user of a task: data counts, memory status and compiled program, as a table or JSON."""
    task, histories = _task_histories(args)
    from persona_dspy.programs import find_program

    location = _memory_location(task, args)
    stored: dict[str, int] = {}
    if location is not None:
        with _open_memory(task, args) as memory:
            stored = {h.user_id: memory.count(h.user_id) for h in histories}
    folder = _programs_dir(task, args)
    rows = []
    for history in histories:
        n_items, n_stored = len(history.items), stored.get(history.user_id, 0)
        memory_status = ("not ingested" if n_stored == 0 else "complete" if n_stored >= n_items
                         else f"partial ({n_stored}/{n_items})")
        path = find_program(task, history.user_id, folder)
        rows.append({"user": history.user_id, "history": n_items, "queries": len(history.queries),
                     "recent": len(history.recent_interactions(args.recent)), "memory_items": n_stored,
                     "memory": memory_status, "program": _program_row(path) if path is not None else None})
    if args.json:
        print(json.dumps({"task": task, "memory": location, "programs": str(folder), "users": rows}, indent=2))
        return 0
    from persona_dspy.evaluation.tables import format_table

    flat = []
    for row in rows:
        program = row["program"] or {}
        flat.append({**{key: row[key] for key in ("user", "history", "queries", "recent", "memory")},
                     "program": "-" if not program else ("unreadable" if "error" in program else
                                                         Path(program["path"]).name),
                     "persona words": program.get("persona_words"), "aligned": (program.get("aligned") or "")[:19],
                     "lm": program.get("lm"), "dev score": program.get("dev_score")})
    print(f"{task}: {plural(len(rows), 'user')}; memory: {location or 'none yet'}; programs: {folder}")
    print(format_table(flat, list(flat[0]), digits=3, missing="-"))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    """delete: forget users' stored memory; rebuild: delete and re-ingest them with the current embeddings."""
    task, histories = _task_histories(args)
    if args.action == "delete":
        if not args.user:
            raise CLIError("memory delete: name the user(s) with --user ID")
        known = {h.user_id for h in histories}
        unknown = [user for user in args.user if user not in known]
        if unknown and args.data is None:
            logger.info("deleting users not in the %s data: %s", task, ", ".join(unknown))
        users = list(args.user)
    else:
        users = [h.user_id for h in histories]
    location = _memory_location(task, args)
    if location is None:
        raise CLIError(f"there is no {task} memory at {args.memory or 'the default folder'}: nothing to {args.action}")
    what = f"{args.action} the {task} memory of {plural(len(users), 'user')} at {location}"
    if not args.yes:
        raise CLIError(f"this would {what}; add --yes to do it")
    with _open_memory(task, args) as memory:
        for user in users:
            memory.delete_user(user)
            logger.info("deleted the memory of %s", user)
        if args.action == "rebuild":
            _ingest(memory, histories, args)
        print(f"{'deleted' if args.action == 'delete' else 'rebuilt'}: {plural(len(users), 'user')} at {location} "
              f"({memory.count()} items stored for {task} now, {memory.embedder.config.label})")
    return 0


def _add_memory_command(sub: Any) -> None:
    """``persona-dspy memory delete|rebuild|copy``: delete and rebuild change stored memory, so they ask for --yes."""
    actions = sub.add_parser("memory", help="delete, rebuild or copy stored memory").add_subparsers(
        dest="action", required=True)
    for action, help_text in (("delete", "forget the --user(s)' stored memory"),
                              ("rebuild", "delete and re-ingest the users' memory (e.g. after --dense changed)")):
        memory = _subcommand(actions, action, help_text)
        _add_data_args(memory, single_task=True)
        _add_memory_args(memory)
        memory.add_argument("--user", action="append", default=None, metavar="ID",
                            help="delete: this user (repeatable)")
        _add_user_args(memory)
        memory.add_argument("--yes", action="store_true", help="confirm: without it nothing is changed")
        _add_progress_arg(memory)
        memory.set_defaults(func=cmd_memory)
    copy = actions.add_parser("copy", help="copy memories between stores (Edge folder, server URL, old local-mode "
                              "folder; batched, resumable, idempotent, counts checked)")
    copy.add_argument("--from", dest="source", required=True, help="folder or http(s) URL to copy from")
    copy.add_argument("--to", dest="target", required=True,
                      help="folder (Qdrant Edge) or URL; the --from folder itself migrates an old local-mode store")
    copy.add_argument("--namespace", nargs="*", default=None, help="only these namespaces, e.g. pd_lamp_3")
    copy.add_argument("--batch-size", type=_positive(int), default=256)
    copy.add_argument("--api-key", default=os.environ.get("PERSONA_DSPY_QDRANT_API_KEY"))
    copy.set_defaults(func=cmd_memory_copy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-dspy", description="PersonaAgent as DSPy programs")
    parser.add_argument("--version", action="version", version=f"persona-dspy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log each stage (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="errors only: no warnings, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = _subcommand(sub, "ingest", "load a LaMP-format dataset into per-user episodic memory")
    _add_data_args(ingest)
    _add_memory_args(ingest)
    _add_user_args(ingest)
    _add_progress_arg(ingest)
    ingest.set_defaults(func=cmd_ingest)

    quality = _subcommand(sub, "retrieval-eval", "ingest a dataset and report retrieval quality (k-nearest vote)")
    _add_data_args(quality)
    _add_memory_args(quality)
    _add_user_args(quality)
    _add_progress_arg(quality)
    quality.add_argument("-k", type=_positive(int), default=5, help="items that vote (default 5)")
    quality.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    quality.set_defaults(func=cmd_retrieval_eval)

    evaluation = _command(sub, "eval", "evaluate PersonaAgent on a dataset: LaMP metrics and a JSON report")
    _add_user_args(evaluation)
    _add_program_args(evaluation)
    evaluation.add_argument("--vs-initial", action="store_true",
                            help="also answer the same users with the initial persona and show both side by side")
    evaluation.add_argument("--mode", choices=MODES, default=None,
                            help="rag (default), react, or none (baseline); programs of another mode are not used")
    evaluation.add_argument("-k", type=_positive(int), default=5, help="passages retrieved per question (default 5)")
    evaluation.add_argument("--workers", type=_positive(int), default=4, help="users evaluated in parallel (default 4)")
    evaluation.add_argument("--max-failures", type=_non_negative, default=5,
                            help="stop starting users after this many failed (default 5; 0 = never stop)")
    evaluation.add_argument("--out", type=Path, default=None,
                            help="JSON report path (default $PERSONA_DSPY_HOME/reports/eval-<task>-<mode>-<time>.json)")
    _add_progress_arg(evaluation)
    evaluation.set_defaults(func=cmd_eval)

    predict = _command(sub, "predict", "answer one query of one user and show the retrieved passages")
    predict.add_argument("--user", required=True, help="user id as in the dataset")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--query-id", help="a query of the dataset (answered within its own profile)")
    which.add_argument("--text", help="a free query (answered from the user's whole memory)")
    predict.add_argument("--mode", choices=MODES, default=None,
                         help="rag, react, or none (baseline); default: the compiled program's, else rag")
    predict.add_argument("-k", type=_positive(int), default=5, help="passages retrieved (default 5)")
    _add_program_args(predict)
    predict.add_argument("--program", type=Path, default=None,
                         help="answer with this compiled program file (its persona, mode and k)")
    predict.set_defaults(func=cmd_predict)

    compile_ = _command(sub, "compile", "align every (or the selected) user's persona and save their programs")
    _add_optimizer_lm_args(compile_)
    _add_user_args(compile_)
    compile_.add_argument("--out", type=Path, default=None,
                          help="program folder (default $PERSONA_DSPY_HOME/programs/<task>)")
    compile_.add_argument("--mode", choices=("rag", "react"), default="rag", help="agent mode (default rag)")
    compile_.add_argument("-k", type=_positive(int), default=5, help="passages retrieved per question (default 5)")
    compile_.add_argument("--recent", type=_positive(int), default=3,
                          help="recent interactions to align on (default 3)")
    compile_.add_argument("--batch-size", type=_positive(int), default=3, help="interactions per step (default 3)")
    compile_.add_argument("--iterations", type=_non_negative, default=3, help="update steps (default 3)")
    compile_.add_argument("--candidates", type=_positive(int), default=1, help="personas proposed per step (default 1)")
    compile_.add_argument("--max-persona-words", type=_positive(int), default=300, help="persona length cap")
    compile_.add_argument("--workers", type=_positive(int), default=4, help="users compiled in parallel (default 4)")
    compile_.add_argument("--force", action="store_true", help="recompile users whose program is current")
    cluster = compile_.add_argument_group("Ray (optional extra: pip install 'persona-dspy[ray]')")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="compile on Ray worker processes: a new local cluster (no ADDRESS), or a running one "
                              "('auto', ray://host:10001); --workers is then threads per process")
    cluster.add_argument("--ray-processes", type=_positive(int), default=None, metavar="N",
                         help="worker processes (tasks in flight; default: the cluster's CPUs)")
    cluster.add_argument("--ray-batch", type=_positive(int), default=None, metavar="N",
                         help="users per Ray task (default: sized by measurement)")
    compile_.add_argument("--settings", type=Path, default=None, metavar="FILE",
                          help="aligner settings from a JSON file, e.g. `tune --out` (its best settings); flags given "
                               "on the command line win")
    _add_progress_arg(compile_)
    compile_.set_defaults(func=cmd_compile)

    compare = _command(sub, "compare", "compare optimizers on the same users: score, LM calls, tokens, time")
    _add_optimizer_lm_args(compare)
    _add_user_args(compare)
    compare.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                         help=f"which to run (default: {' '.join(DEFAULT_OPTIMIZERS)})")
    compare.add_argument("--recent", type=_positive(int), default=3, help="recent interactions per user (default 3)")
    compare.add_argument("-k", type=_positive(int), default=5, help="passages retrieved per question (default 5)")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", type=Path, default=None,
                         help="report folder (default $PERSONA_DSPY_HOME/reports/compare-<task>)")
    _add_progress_arg(compare)
    compare.set_defaults(func=cmd_compare)

    tune = _command(sub, "tune", "search the aligner's settings on dev users with Optuna (resumable study)",
                    temperature=False)  # the temperature is one of the settings searched
    _add_optimizer_lm_args(tune)
    _add_user_args(tune)
    tune.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///$PERSONA_DSPY_HOME/tuning.db)")
    tune.add_argument("--study-name", default=None, help="default tune-<task>-<mode>")
    tune.add_argument("--n-trials", type=_positive(int), default=30,
                      help="finished trials the study should have (a rerun completes the remainder; default 30)")
    tune.add_argument("--max-calls-per-user", type=_positive(float), default=None,
                      help="LM-call budget per user: trials over it are infeasible")
    tune.add_argument("--multi-objective", action="store_true", help="maximise the score and minimise LM calls")
    tune.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--mode", choices=("rag", "react"), default="rag")
    tune.add_argument("--recent", type=_positive(int), default=3, help="recent interactions per user (default 3)")
    tune.add_argument("--workers", type=_positive(int), default=4, help="users aligned in parallel (default 4)")
    tune.add_argument("--out", type=Path, default=None,
                      help="also write the summary as JSON here (`compile --settings` takes it)")
    _add_progress_arg(tune)
    tune.set_defaults(func=cmd_tune)

    serve = _subcommand(sub, "serve", "run the embedded llama.cpp server (OpenAI-compatible) until Ctrl-C")
    serve.add_argument("--model", default=None, help="a .gguf path or a known model name (default: the default model)")
    _add_server_args(serve, slots_default="1")
    serve.set_defaults(func=cmd_serve)

    models = _subcommand(sub, "models", "list, fetch or remove cached model files (GGUF)")
    models.add_argument("action", choices=("list", "fetch", "remove"), nargs="?", default="list")
    models.add_argument("names", nargs="*", help="model names (fetch: default the default model)")
    models.add_argument("--verify", action="store_true", help="list: check each known file's SHA-256")
    models.set_defaults(func=cmd_models)

    users = _subcommand(sub, "users", "list a task's users: data counts, memory status and compiled program")
    _add_data_args(users, single_task=True)
    _add_memory_args(users)
    _add_user_args(users)
    _add_program_args(users, initial=False)
    users.add_argument("--recent", type=_positive(int), default=3, help="recent interactions counted (default 3)")
    users.add_argument("--json", action="store_true", help="print JSON instead of a table")
    users.set_defaults(func=cmd_users)

    _add_memory_command(sub)
    return parser


def _add_program_args(parser: argparse.ArgumentParser, initial: bool = True) -> None:
    """Where compiled programs are looked up (each user's by ``programs.program_path``)."""
    parser.add_argument("--programs", type=Path, default=None, metavar="DIR",
                        help="compiled programs folder (default $PERSONA_DSPY_HOME/programs/<task>, where compile "
                             "saves)")
    if initial:
        parser.add_argument("--initial", action="store_true",
                            help="answer with the initial persona even where a compiled program exists")


class _Interrupts:
    """Ctrl-C and SIGTERM: the first stops the run gracefully (or raises KeyboardInterrupt outside a run of users),
    the second exits at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signals = 0
        self._graceful = False

    def handle(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.signals > 1:
            sys.stderr.write("\npersona-dspy: stopped at once\n")
            sys.stderr.flush()
            os._exit(130)
        if not self._graceful:
            raise KeyboardInterrupt
        self.event.set()
        sys.stderr.write("\npersona-dspy: stopping: no new users start, those in flight get a few seconds; the "
                         "results so far are written (Ctrl-C again quits at once)\n")
        sys.stderr.flush()

    @contextlib.contextmanager
    def graceful(self):
        """Within: a signal sets the event the run of users watches, instead of raising."""
        self._graceful = True
        try:
            yield self.event
        finally:
            self._graceful = False

    @contextlib.contextmanager
    def installed(self):
        self.event.clear()
        self.signals = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_INTERRUPTS = _Interrupts()


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one line: only the classes of modules already imported (none is imported here)."""
    classes: list[type[BaseException]] = [CLIError, ValueError]
    for module, name in (("dspy.utils.exceptions", "LMError"), ("persona_dspy.lm.local_server", "LocalServerError"),
                         ("persona_dspy.lm.models", "ModelError"),
                         ("persona_dspy.memory.embeddings", "EmbeddingModelError"),
                         ("persona_dspy.memory.episodic", "MemoryStoreError"),
                         ("persona_dspy.jobs.distributed", "RayNotInstalledError")):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):
            classes.append(getattr(loaded, name))
    return tuple(classes)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``compile --settings FILE`` makes the file's values the defaults, so explicit flags still win."""
    args = parser.parse_args(argv)
    if getattr(args, "settings", None) is not None:
        try:
            defaults = _settings_defaults(args.settings, args.task)
        except CLIError as exc:
            parser.exit(2, f"persona-dspy: error: {exc}\n")
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _configure_logging(args)
    local = sys.modules.get("persona_dspy.lm.local_server")
    callers_servers = local.running() if local is not None else frozenset()
    code = 2
    try:
        with _INTERRUPTS.installed():
            code = args.func(args)
    except KeyboardInterrupt:
        print("\npersona-dspy: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `persona-dspy users | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"persona-dspy: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        local = sys.modules.get("persona_dspy.lm.local_server")
        if local is not None:  # an embedded model server ends with the command, whatever happened
            local.stop_all(keep=callers_servers)
    if code == 130 and _lingering_workers():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # abandoned users' threads wait on LM calls; the interpreter would join them at exit
    return code


def _lingering_workers() -> bool:
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread())

if __name__ == "__main__":
    sys.exit(main())
