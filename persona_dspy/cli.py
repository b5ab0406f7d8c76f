"""The ``persona-dspy`` command line.

Commands: ``ingest`` (a dataset into per-user memory), ``memory copy`` (between stores), ``retrieval-eval`` (how
well memory alone predicts),
``eval`` (PersonaAgent over a dataset, LaMP metrics, a JSON report), ``predict`` (one query of one user) and
``compile`` (align every user's persona and save their program files), ``compare`` (the aligner against DSPy's
optimizers) and ``tune`` (search the aligner's settings with Optuna).
Every failure the user can fix is reported as ``persona-dspy: error: ...`` on stderr with exit code 2, no
traceback; ``eval`` and ``compile`` exit 1 when some (not all) users failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports dspy and friends lazily, so that `--help` and data errors stay fast
    import dspy

    from persona_dspy.data.records import UserHistory
    from persona_dspy.memory.episodic import EpisodicMemory

logger = logging.getLogger(__name__)

SHIPPED_TASKS = ("LaMP_2N", "LaMP_3", "LaMP_2M")
MODES = ("rag", "react", "none")
DEFAULT_OPTIMIZERS = ("initial", "non_personalized", "persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot")
NO_LM_HINT = ("no LM given: pass --lm (e.g. `--lm offline` for the offline stand-in, or "
              "`--lm openai/<model> --api-base http://localhost:8000/v1` for a local server) or set PERSONA_DSPY_LM")


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
                             "default: the sample shipped in data/<task>")
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
                        help="'offline' (the stand-in: a plumbing check, never a model), openai/<model> or "
                             "hosted_vllm/<model> with --api-base, ollama_chat/<model>; default env PERSONA_DSPY_LM")
    parser.add_argument("--api-base", default=None,
                        help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (env PERSONA_DSPY_API_BASE)")
    parser.add_argument("--api-key", default=None,
                        help="API key (prefer env PERSONA_DSPY_API_KEY: command lines end up in shell history)")
    if temperature:
        parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument("--max-tokens", type=_positive(int), default=512,
                        help="completion token cap per call (default 512)")
    parser.add_argument("--timeout", type=_positive(float), default=60.0, help="seconds per LM request (default 60)")
    parser.add_argument("--retries", type=_non_negative, default=3,
                        help="retries of a failed LM request, with backoff (default 3)")


def _add_optimizer_lm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer-lm", default=None,
                        help="a separate LM for textual loss, persona updates and reflection "
                             "(env PERSONA_DSPY_OPTIMIZER_LM; default: the task LM)")
    parser.add_argument("--optimizer-api-base", default=None, help="its server (env PERSONA_DSPY_OPTIMIZER_API_BASE)")


def _add_user_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", nargs="+", default=None, metavar="ID", help="only these user ids")
    parser.add_argument("--max-users", type=_positive(int), default=None, metavar="N",
                        help="at most N users (the first in dataset order)")


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
    parser = sub.add_parser(name, help=help)
    _add_data_args(parser, single_task=True)
    _add_memory_args(parser)
    _add_lm_args(parser, temperature=temperature)
    return parser


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


def cmd_ingest(args: argparse.Namespace) -> int:
    for task in _tasks(args):
        histories = _load(task, args)
        with _open_memory(task, args) as memory:
            written = memory.add_histories(histories)
            print(f"{task}: {len(histories)} users, {written} items written, {memory.count()} stored "
                  f"at {memory.location} ({memory.embedder.config.label}, {memory.layout})")
    return 0


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    """Ingest (idempotent) and print how well a k-nearest vote over each query's own profile does."""
    from persona_dspy.evaluation.retrieval_quality import evaluate_retrieval

    rows = []
    for task in _tasks(args):
        histories = _load(task, args)
        with _open_memory(task, args) as memory:
            memory.add_histories(histories)
            strategies = ["recency", "majority", "bm25"] + (["dense", "hybrid"] if memory.embedder.has_dense else [])
            for strategy in strategies:
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
    """The LM the flags (or PERSONA_DSPY_* variables) name; checked before any data is loaded or call is sent."""
    from persona_dspy.lm.build import ENV_LM, build_lm

    if not (args.lm or "").strip() and not os.environ.get(ENV_LM, "").strip():
        raise CLIError(NO_LM_HINT)
    lm = build_lm(args.lm, args.api_base, api_key=args.api_key, temperature=getattr(args, "temperature", 0.0),
                  max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries)
    if lm.kwargs.get("api_base"):
        import litellm

        litellm.suppress_debug_info = True  # its "Give Feedback / Get Help" banner is noise next to our one-line errors
    return lm


def _build_optimizer_lm(args: argparse.Namespace, task_lm: dspy.LM) -> dspy.LM:
    """The LM for loss, updates and reflection: --optimizer-lm (or its env variable), else the task LM itself."""
    from persona_dspy.lm.build import build_optimizer_lm

    return build_optimizer_lm(args.optimizer_lm, args.optimizer_api_base, task_lm=task_lm,
                              temperature=getattr(args, "temperature", 0.0), max_tokens=args.max_tokens,
                              timeout=args.timeout, num_retries=args.retries)


def _lm_hint(lm: dspy.LM) -> str:
    from persona_dspy.lm.build import describe_lm

    base = describe_lm(lm).get("api_base")
    return f" (is the LM server at {base} running and serving {lm.model.partition('/')[2]!r}?)" if base else ""


def _task_histories(args: argparse.Namespace) -> tuple[str, list[UserHistory]]:
    """One task's users: the task name (LaMP_2 resolved from the data) and its histories."""
    from persona_dspy.data.tasks import normalize_task_name

    task = normalize_task_name(args.task)
    histories = _load(task, args)
    if not histories:
        raise CLIError(f"no users in the {task} data")
    return histories[0].task, histories


def _report_path(args: argparse.Namespace, task: str) -> Path:
    if args.out is not None:
        return args.out
    from persona_dspy.memory.episodic import default_memory_path

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return default_memory_path().parent / "reports" / f"eval-{task}-{args.mode}-{stamp}.json"


def cmd_eval(args: argparse.Namespace) -> int:
    """Ingest (idempotent), evaluate PersonaAgent on every user, print the table and write the JSON report."""
    from persona_dspy.evaluation.evaluate import evaluate

    lm = _build_lm(args)
    task, histories = _task_histories(args)
    options = dict(mode=args.mode, lm=lm, workers=args.workers, k=args.k, progress=not args.no_progress,
                   max_failures=args.max_failures or None)
    if args.mode == "none":
        report = evaluate(histories, memory=None, **options)  # the baseline reads no memory: nothing to ingest
    else:
        with _open_memory(task, args) as memory:
            memory.add_histories(histories)
            report = evaluate(histories, memory=memory, **options)
    report.dataset = {"path": str(_data_folder(task, args)), "split": args.split}
    print(report.summary_table())
    path = report.to_json(_report_path(args, task))
    print(f"report: {path}")
    if report.n_scored == 0:
        first = report.failures[0] if report.failures else None
        cause = f"; first: user {first.user_id} at {first.stage}: {first.error_type}: {first.error}" if first else ""
        raise CLIError(f"no user could be evaluated ({len(report.failures)} failed, {len(report.skipped_users)} "
                       f"skipped){cause}{_lm_hint(lm)}")
    if not report.complete:
        print(f"persona-dspy: warning: {len(report.failures)} users failed and {len(report.skipped_users)} were "
              f"skipped; the metrics cover the other {len(report.per_user)} users only", file=sys.stderr)
        return 1
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Align users' personas on their recent interactions and save one program file per user (resumable)."""
    from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
    from persona_dspy.jobs.compile import compile_users
    from persona_dspy.lm.build import is_offline
    from persona_dspy.memory.episodic import default_memory_path

    lm = _build_lm(args)
    optimizer_lm = _build_optimizer_lm(args, lm)
    task, histories = _task_histories(args)
    histories = _selected(histories, args)
    out = args.out if args.out is not None else default_memory_path().parent / "programs" / task
    with _open_memory(task, args) as memory:
        memory.add_histories(histories)
        summary = compile_users(
            histories, memory=memory, out_dir=out, lm=lm, optimizer_lm=optimizer_lm, mode=args.mode, k=args.k,
            n_recent=args.recent, workers=args.workers, force=args.force,
            progress=not args.no_progress, batch_size=args.batch_size, iterations=args.iterations,
            candidates_per_step=args.candidates, max_persona_words=args.max_persona_words,
        )
    print(summary.table())
    if is_offline(lm):
        print(f"NOTE: {OFFLINE_NOTE}")
    print(f"programs: {out}")
    failed = summary.count("failed")
    if failed and failed == len(summary.results):
        raise CLIError(f"no user could be compiled; first: {summary.results[0].error}{_lm_hint(lm)}")
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every optimizer on the same users, trainsets and validation slices; write JSON and CSV."""
    from persona_dspy.jobs.comparison import compare_optimizers
    from persona_dspy.memory.episodic import default_memory_path

    lm = _build_lm(args)
    optimizer_lm = _build_optimizer_lm(args, lm)
    task, histories = _task_histories(args)
    histories = _selected(histories, args)
    out = args.out if args.out is not None else default_memory_path().parent / "reports" / f"compare-{task}"
    with _open_memory(task, args) as memory:
        memory.add_histories(histories)
        report = compare_optimizers(histories, memory=memory, lm=lm, optimizer_lm=optimizer_lm,
                                    optimizers=tuple(args.optimizers), n_recent=args.recent, k=args.k,
                                    seed=args.seed, progress=not args.no_progress)
    print(report.table())
    for kind, path in report.save(out).items():
        print(f"{kind}: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the aligner's settings on dev users with Optuna (SQLite study, resumable)."""
    from persona_dspy.files import write_atomically
    from persona_dspy.jobs.tuning import run_tuning
    from persona_dspy.memory.episodic import default_memory_path

    # Built here only to check the flags before any data is loaded (nothing is sent): each trial builds its own LM
    # at the trial's temperature.
    _build_optimizer_lm(args, _build_lm(args))
    import optuna

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one log line per trial is noise next to the summary
    task, histories = _task_histories(args)
    histories = _selected(histories, args)
    storage = args.storage or f"sqlite:///{default_memory_path().parent / 'tuning.db'}"
    with _open_memory(task, args) as memory:
        memory.add_histories(histories)
        summary = run_tuning(
            task, histories, memory, lm_model=args.lm, api_base=args.api_base, api_key=args.api_key,
            optimizer_lm_model=args.optimizer_lm, optimizer_api_base=args.optimizer_api_base, storage=storage,
            study_name=args.study_name or f"tune-{task}-{args.mode}", n_trials=args.n_trials,
            max_lm_calls_per_user=args.max_calls_per_user, multi_objective=args.multi_objective,
            algorithm=args.sampler, seed=args.seed, n_recent=args.recent, mode=args.mode, workers=args.workers,
            max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries,
        )
    print(f"{task}: {summary['trials_done']} trials done ({summary['trials_failed']} failed) in {storage}")
    if summary.get("note"):
        print(f"NOTE: {summary['note']}")
    if summary.get("no_best_reason"):
        print(f"no best settings: {summary['no_best_reason']}")
    else:
        print(f"best settings: {json.dumps(summary['best_settings'])}")
        print(f"best {summary['metric']}: {summary['best_metric_value']}  "
              f"LM calls per user: {summary['lm_calls_per_user']}")
    if args.out is not None:
        write_atomically(args.out, (json.dumps(summary, indent=2, default=str) + "\n").encode("utf-8"))
        print(f"summary: {args.out}")
    return 1 if summary.get("no_best_reason") else 0


def _find_user(histories: list[UserHistory], user_id: str) -> UserHistory:
    from persona_dspy.data.records import select_users

    return select_users(histories, [user_id])[0]


def cmd_predict(args: argparse.Namespace) -> int:
    """Answer one query of one user and show what the agent retrieved: a look at single cases."""
    import dspy
    from dspy.utils.exceptions import LMError

    from persona_dspy.agent.semantic_memory import initial_agent
    from persona_dspy.data.examples import query_examples
    from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
    from persona_dspy.lm.build import LMUsage, is_offline

    lm = _build_lm(args)
    task, histories = _task_histories(args)
    history = _find_user(histories, args.user)
    gold = None
    if args.query_id is not None:
        examples = {str(e.example_id): e for e in query_examples(history)}
        if args.query_id not in examples:
            raise CLIError(f"user {history.user_id!r} has no query {args.query_id!r}; their queries: "
                           f"{', '.join(examples) or 'none'}")
        example = examples[args.query_id]
        query, scope, gold = example.query, example.scope, example.answer
        where = f"query {args.query_id} (its own profile: {len(scope.within_ids or ())} items)"
    else:
        if not args.text.strip():
            raise CLIError("--text is empty")
        query, scope, where = args.text, None, "free text (the user's whole memory)"

    usage = LMUsage()

    def answer(memory: EpisodicMemory | None) -> dspy.Prediction:
        with dspy.context(lm=lm, callbacks=[*(dspy.settings.callbacks or []), usage]):
            if args.program is not None:
                from persona_dspy.programs import load_program

                agent = load_program(args.program, memory, user_id=history.user_id, task=task)
            else:
                agent = initial_agent(history, memory, mode=args.mode, k=args.k)
            return agent(query=query, scope=scope)

    try:
        if args.mode == "none" and args.program is None:
            prediction = answer(None)
        else:
            with _open_memory(task, args) as memory:
                memory.add_histories([history])
                prediction = answer(memory)
    except LMError as exc:
        raise CLIError(f"the LM call failed: {exc}{_lm_hint(lm)}") from exc

    print(f"task: {task}  user: {history.user_id}  mode: {args.mode}  lm: {lm.model}")
    if is_offline(lm):
        print(f"NOTE: {OFFLINE_NOTE}")
    print(f"query: {where}")
    print(f"answer: {prediction.answer}")
    print(f"raw answer: {prediction.raw_answer}")
    if gold is not None:
        print(f"gold: {gold}")
    passages = list(prediction.passages or [])
    if args.mode == "rag":
        print(f"retrieved passages ({len(passages)}):")
        for i, passage in enumerate(passages, 1):
            print(f"  {i}. {passage.render()}  [item {passage.item_id}, score {passage.score:.3f}]")
    elif args.mode == "react":
        print("retrieved passages: none up front (react searches memory through its tool while reasoning)")
    else:
        print("retrieved passages: none (mode none reads no memory)")
    snap = usage.snapshot()
    print(f"LM calls: {snap['calls']}, tokens: {snap['total_tokens']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-dspy", description="PersonaAgent as DSPy programs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="load a LaMP-format dataset into per-user episodic memory")
    _add_data_args(ingest)
    _add_memory_args(ingest)
    ingest.set_defaults(func=cmd_ingest)

    quality = sub.add_parser("retrieval-eval", help="ingest a dataset and report retrieval quality (k-nearest vote)")
    _add_data_args(quality)
    _add_memory_args(quality)
    quality.add_argument("-k", type=int, default=5, help="items that vote (default 5)")
    quality.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    quality.set_defaults(func=cmd_retrieval_eval)

    memory = sub.add_parser("memory", help="manage memory stores").add_subparsers(dest="action", required=True)
    copy = memory.add_parser("copy", help="copy memories between stores (Edge folder, server URL, old local-mode "
                             "folder; batched, resumable, idempotent, counts checked)")
    copy.add_argument("--from", dest="source", required=True, help="folder or http(s) URL to copy from")
    copy.add_argument("--to", dest="target", required=True,
                      help="folder (Qdrant Edge) or URL; the --from folder itself migrates an old local-mode store")
    copy.add_argument("--namespace", nargs="*", default=None, help="only these namespaces, e.g. pd_lamp_3")
    copy.add_argument("--batch-size", type=_positive(int), default=256)
    copy.add_argument("--api-key", default=os.environ.get("PERSONA_DSPY_QDRANT_API_KEY"))
    copy.set_defaults(func=cmd_memory_copy)

    evaluation = _command(sub, "eval", "evaluate PersonaAgent on a dataset: LaMP metrics and a JSON report")
    evaluation.add_argument("--mode", choices=MODES, default="rag", help="rag (default), react, or none (baseline)")
    evaluation.add_argument("-k", type=_positive(int), default=5, help="passages retrieved per question (default 5)")
    evaluation.add_argument("--workers", type=_positive(int), default=4, help="users evaluated in parallel (default 4)")
    evaluation.add_argument("--max-failures", type=_non_negative, default=5,
                            help="stop starting users after this many failed (default 5; 0 = never stop)")
    evaluation.add_argument("--out", type=Path, default=None,
                            help="JSON report path (default $PERSONA_DSPY_HOME/reports/eval-<task>-<mode>-<time>.json)")
    evaluation.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluation.set_defaults(func=cmd_eval)

    predict = _command(sub, "predict", "answer one query of one user and show the retrieved passages")
    predict.add_argument("--user", required=True, help="user id as in the dataset")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--query-id", help="a query of the dataset (answered within its own profile)")
    which.add_argument("--text", help="a free query (answered from the user's whole memory)")
    predict.add_argument("--mode", choices=MODES, default="rag", help="rag (default), react, or none (baseline)")
    predict.add_argument("-k", type=_positive(int), default=5, help="passages retrieved (default 5)")
    predict.add_argument("--program", type=Path, default=None,
                         help="answer with this user's compiled program file (its persona, mode and k)")
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
    compile_.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    tune.add_argument("--out", type=Path, default=None, help="also write the summary as JSON here")
    tune.set_defaults(func=cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from dspy.utils.exceptions import LMError

    from persona_dspy.data.lamp import DataError
    from persona_dspy.memory.embeddings import EmbeddingModelError
    from persona_dspy.memory.episodic import MemoryStoreError

    try:
        return args.func(args)
    except (CLIError, DataError, EmbeddingModelError, MemoryStoreError, LMError, ValueError) as exc:
        print(f"persona-dspy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
