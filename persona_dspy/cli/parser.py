"""``build_parser``: every command with its flags, and the function that runs it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from persona_dspy import __version__
from persona_dspy.cli.answer_commands import cmd_eval, cmd_predict
from persona_dspy.cli.arguments import (
    add_data_args,
    add_memory_args,
    add_optimizer_lm_args,
    add_program_args,
    add_progress_arg,
    add_server_args,
    add_user_args,
    non_negative,
    positive,
    subcommand,
    task_command,
)
from persona_dspy.cli.memory_commands import cmd_ingest, cmd_memory, cmd_memory_copy, cmd_retrieval_eval, cmd_users
from persona_dspy.cli.optimize_commands import cmd_compare, cmd_compile, cmd_tune
from persona_dspy.cli.server_commands import cmd_models, cmd_serve

MODES = ("demos", "rag", "react", "none")


DEFAULT_OPTIMIZERS = ("initial", "non_personalized", "persona_aligner", "gepa", "miprov2", "copro", "bootstrap_fewshot")


def _add_memory_command(sub: Any) -> None:
    """``persona-dspy memory delete|rebuild|copy``: delete and rebuild change stored memory, so they ask for --yes."""
    actions = sub.add_parser("memory", help="delete, rebuild or copy stored memory").add_subparsers(
        dest="action", required=True)
    for action, help_text in (("delete", "forget the --user(s)' stored memory"),
                              ("rebuild", "re-ingest the users' memory (e.g. after --dense changed), built beside "
                                          "the old memory and swapped in: a killed rebuild leaves the old one whole")):
        memory = subcommand(actions, action, help_text)
        add_data_args(memory, single_task=True)
        add_memory_args(memory)
        memory.add_argument("--user", action="append", default=None, metavar="ID",
                            help="delete: this user (repeatable)")
        add_user_args(memory)
        memory.add_argument("--yes", action="store_true", help="confirm: without it nothing is changed")
        add_progress_arg(memory)
        memory.set_defaults(func=cmd_memory)
    copy = actions.add_parser("copy", help="copy memories between stores (Edge folder, server URL, old local-mode "
                              "folder; batched, resumable, idempotent, counts checked)")
    copy.add_argument("--from", dest="source", required=True, help="folder or http(s) URL to copy from")
    copy.add_argument("--to", dest="target", required=True,
                      help="folder (Qdrant Edge) or URL; the --from folder itself migrates an old local-mode store")
    copy.add_argument("--namespace", nargs="*", default=None, help="only these namespaces, e.g. pd_lamp_3")
    copy.add_argument("--batch-size", type=positive(int), default=256)
    copy.add_argument("--api-key", default=os.environ.get("PERSONA_DSPY_QDRANT_API_KEY"))
    copy.set_defaults(func=cmd_memory_copy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-dspy", description="PersonaAgent as DSPy programs")
    parser.add_argument("--version", action="version", version=f"persona-dspy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log each stage (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="errors only: no warnings, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = subcommand(sub, "ingest", "load a LaMP-format dataset into per-user episodic memory")
    add_data_args(ingest)
    add_memory_args(ingest)
    add_user_args(ingest)
    add_progress_arg(ingest)
    ingest.set_defaults(func=cmd_ingest)

    quality = subcommand(sub, "retrieval-eval", "ingest a dataset and report retrieval quality (k-nearest vote)")
    add_data_args(quality)
    add_memory_args(quality)
    add_user_args(quality)
    add_progress_arg(quality)
    quality.add_argument("-k", type=positive(int), default=5, help="items that vote (default 5)")
    quality.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    quality.set_defaults(func=cmd_retrieval_eval)

    evaluation = task_command(sub, "eval", "evaluate PersonaAgent on a dataset: LaMP metrics and a JSON report")
    add_user_args(evaluation)
    add_program_args(evaluation)
    evaluation.add_argument("--vs-initial", action="store_true",
                            help="also answer the same users with the initial persona and show both side by side")
    evaluation.add_argument("--mode", choices=MODES, default=None,
                            help="demos (default for label tasks), rag, react, or none (baseline); programs of another "
                                 "mode are not used")
    evaluation.add_argument("-k", type=positive(int), default=5, help="passages retrieved per question (default 5)")
    evaluation.add_argument("--workers", type=positive(int), default=4, help="users evaluated in parallel (default 4)")
    evaluation.add_argument("--max-failures", type=non_negative, default=5,
                            help="stop starting users after this many failed (default 5; 0 = never stop)")
    evaluation.add_argument("--out", type=Path, default=None,
                            help="JSON report path (default $PERSONA_DSPY_HOME/reports/eval-<task>-<mode>-<time>.json)")
    add_progress_arg(evaluation)
    evaluation.set_defaults(func=cmd_eval)

    predict = task_command(sub, "predict", "answer one query of one user and show the retrieved passages")
    predict.add_argument("--user", required=True, help="user id as in the dataset")
    which = predict.add_mutually_exclusive_group(required=True)
    which.add_argument("--query-id", help="a query of the dataset (answered within its own profile)")
    which.add_argument("--text", help="a free query (answered from the user's whole memory)")
    predict.add_argument("--mode", choices=MODES, default=None,
                         help="rag, react, or none (baseline); default: the compiled program's, else rag")
    predict.add_argument("-k", type=positive(int), default=5, help="passages retrieved (default 5)")
    add_program_args(predict)
    predict.add_argument("--program", type=Path, default=None,
                         help="answer with this compiled program file (its persona, mode and k)")
    predict.set_defaults(func=cmd_predict)

    compile_ = task_command(sub, "compile", "align every (or the selected) user's persona and save their programs")
    add_optimizer_lm_args(compile_)
    add_user_args(compile_)
    compile_.add_argument("--out", type=Path, default=None,
                          help="program folder (default $PERSONA_DSPY_HOME/programs/<task>)")
    compile_.add_argument("--mode", choices=("demos", "rag", "react"), default="demos",
                          help="agent mode (default demos: the user's similar past items as demonstrations)")
    compile_.add_argument("-k", type=positive(int), default=5, help="passages retrieved per question (default 5)")
    compile_.add_argument("--recent", type=positive(int), default=3,
                          help="recent interactions to align on (default 3)")
    compile_.add_argument("--batch-size", type=positive(int), default=3, help="interactions per step (default 3)")
    compile_.add_argument("--iterations", type=non_negative, default=1,
                          help="update steps (default 1: on a small model one step and its check cost ~2x the calls)")
    compile_.add_argument("--candidates", type=positive(int), default=1, help="personas proposed per step (default 1)")
    compile_.add_argument("--max-persona-words", type=positive(int), default=300, help="persona length cap")
    compile_.add_argument("--workers", type=positive(int), default=4, help="users compiled in parallel (default 4)")
    compile_.add_argument("--force", action="store_true", help="recompile users whose program is current")
    cluster = compile_.add_argument_group("Ray (optional extra: pip install 'persona-dspy[ray]')")
    cluster.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="compile on Ray worker processes: a new local cluster (no ADDRESS), or a running one "
                              "('auto', ray://host:10001); --workers is then threads per process")
    cluster.add_argument("--ray-processes", type=positive(int), default=None, metavar="N",
                         help="worker processes (tasks in flight; default: the cluster's CPUs)")
    cluster.add_argument("--ray-batch", type=positive(int), default=None, metavar="N",
                         help="users per Ray task (default: sized by measurement)")
    compile_.add_argument("--settings", type=Path, default=None, metavar="FILE",
                          help="aligner settings from a JSON file, e.g. `tune --out` (its best settings); flags given "
                               "on the command line win")
    add_progress_arg(compile_)
    compile_.set_defaults(func=cmd_compile)

    compare = task_command(sub, "compare", "compare optimizers on the same users: score, LM calls, tokens, time")
    add_optimizer_lm_args(compare)
    add_user_args(compare)
    compare.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                         help=f"which to run (default: {' '.join(DEFAULT_OPTIMIZERS)})")
    compare.add_argument("--recent", type=positive(int), default=3, help="recent interactions per user (default 3)")
    compare.add_argument("-k", type=positive(int), default=5, help="passages retrieved per question (default 5)")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", type=Path, default=None,
                         help="report folder (default $PERSONA_DSPY_HOME/reports/compare-<task>)")
    add_progress_arg(compare)
    compare.set_defaults(func=cmd_compare)

    tune = task_command(sub, "tune", "search the aligner's settings on dev users with Optuna (resumable study)",
                    temperature=False)  # the temperature is one of the settings searched
    add_optimizer_lm_args(tune)
    add_user_args(tune)
    tune.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///$PERSONA_DSPY_HOME/tuning.db)")
    tune.add_argument("--study-name", default=None, help="default tune-<task>-<mode>")
    tune.add_argument("--n-trials", type=positive(int), default=30,
                      help="finished trials the study should have (a rerun completes the remainder; default 30)")
    tune.add_argument("--max-calls-per-user", type=positive(float), default=None,
                      help="LM-call budget per user: trials over it are infeasible")
    tune.add_argument("--multi-objective", action="store_true", help="maximise the score and minimise LM calls")
    tune.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--mode", choices=("demos", "rag", "react"), default="demos")
    tune.add_argument("--recent", type=positive(int), default=3, help="recent interactions per user (default 3)")
    tune.add_argument("--workers", type=positive(int), default=4, help="users aligned in parallel (default 4)")
    tune.add_argument("--out", type=Path, default=None,
                      help="also write the summary as JSON here (`compile --settings` takes it)")
    add_progress_arg(tune)
    tune.set_defaults(func=cmd_tune)

    serve = subcommand(sub, "serve", "run the embedded llama.cpp server (OpenAI-compatible) until Ctrl-C")
    serve.add_argument("--model", default=None, help="a .gguf path or a known model name (default: the default model)")
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    models = subcommand(sub, "models", "list, fetch or remove cached model files (GGUF)")
    models.add_argument("action", choices=("list", "fetch", "remove"), nargs="?", default="list")
    models.add_argument("names", nargs="*", help="model names (fetch: default the default model)")
    models.add_argument("--verify", action="store_true", help="list: check each known file's SHA-256")
    models.set_defaults(func=cmd_models)

    users = subcommand(sub, "users", "list a task's users: data counts, memory status and compiled program")
    add_data_args(users, single_task=True)
    add_memory_args(users)
    add_user_args(users)
    add_program_args(users, initial=False)
    users.add_argument("--recent", type=positive(int), default=3, help="recent interactions counted (default 3)")
    users.add_argument("--json", action="store_true", help="print JSON instead of a table")
    users.set_defaults(func=cmd_users)

    _add_memory_command(sub)
    return parser
