"""Commands that optimize personas: ``compile`` (threads, or Ray worker processes with ``--ray``), ``compare``
(the aligner against DSPy's optimizers) and ``tune`` (the aligner's settings, searched with Optuna)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from persona_dspy.cli.arguments import progress_flag
from persona_dspy.cli.errors import CLIError
from persona_dspy.cli.interrupts import INTERRUPTS
from persona_dspy.cli.lm_options import build_lms, check_strict, lm_configs, lm_hint
from persona_dspy.cli.task_data import ingest_histories, open_memory, task_histories
from persona_dspy.console import plural

if TYPE_CHECKING:  # imported lazily, so that `--help` and data errors stay fast
    from persona_dspy.data.records import UserHistory
    from persona_dspy.jobs.compile_config import CompileConfig

logger = logging.getLogger(__name__)


def cmd_compile(args: argparse.Namespace) -> int:
    """Align users' personas on their recent interactions and save one program file per user (resumable)."""
    task, histories = task_histories(args)  # data and user errors first: they import nothing heavy
    from persona_dspy.files import check_writable_dir
    from persona_dspy.programs import default_programs_dir

    out = args.out if args.out is not None else default_programs_dir(task)
    check_writable_dir(out)  # before the model server, the ingest and any call; compile_users checks the space too
    if args.ray is not None:  # the only place Ray enters: without --ray it is never imported
        lm, summary = _compile_on_ray(args, task, histories, out)
    else:
        lm, optimizer_lm = build_lms(args)
        from persona_dspy.jobs.compile import compile_users
        with open_memory(task, args) as memory:
            ingest_histories(memory, histories, args)
            with INTERRUPTS.graceful() as interrupt:
                logger.info("compiling %s into %s", plural(len(histories), "user"), out)
                summary = compile_users(histories, compile_config(args, out), memory=memory, lm=lm,
                                        optimizer_lm=optimizer_lm, progress=progress_flag(args), interrupt=interrupt)
    from persona_dspy.evaluation.evaluate import OFFLINE_NOTE
    from persona_dspy.lm.report import is_offline
    print(summary.table())
    if is_offline(lm):
        print(f"NOTE: {OFFLINE_NOTE}")
    print(f"programs: {out}")
    if summary.interrupted:
        print(f"persona-dspy: interrupted: {plural(len(summary.results), 'user')} done and recorded; rerun the same "
              "command to continue", file=sys.stderr)
        return INTERRUPTS.exit_code
    failed = summary.count("failed")
    data = data_failures(summary.results, task, args)
    if failed and failed == len(summary.results):
        first = summary.results[0].error
        raise CLIError(f"no user could be compiled; first: {first}{lm_hint(lm, first)}"
                       + (f"; {data}" if data else ""))
    check_strict(summary.output_totals(), args)
    if summary.summary_error:
        print(f"persona-dspy: warning: {summary.summary_error}", file=sys.stderr)
    if data:
        print(f"persona-dspy: {data}", file=sys.stderr)
    return 1 if failed or summary.summary_error else 0


def compile_config(args: argparse.Namespace, out: Path) -> CompileConfig:
    """compile's settings from its flags (after ``--settings``), the same for threads and Ray."""
    from persona_dspy.jobs.compile_config import CompileConfig

    return CompileConfig(out, mode=args.mode, k=args.k, n_recent=args.recent, workers=args.workers, force=args.force,
                         aligner_settings={"batch_size": args.batch_size, "iterations": args.iterations,
                                           "candidates_per_step": args.candidates,
                                           "max_persona_words": args.max_persona_words})


def data_failures(results: list, task: str, args: argparse.Namespace) -> str | None:
    """What to say when users failed because of their records: it is the data, which file, which users."""
    bad = [r for r in results if r.status == "failed" and r.data_error]
    if not bad:
        return None
    from persona_dspy.cli.task_data import data_folder

    where = Path(data_folder(task, args)) / f"{args.split}_questions.json"
    users = "; ".join(str(r.error).partition(": ")[2] for r in bad[:5]) + ("; ..." if len(bad) > 5 else "")
    return (f"{plural(len(bad), 'user')} failed because of the data, not the model: fix or drop them in {where} "
            f"({users})")


def _compile_on_ray(args: argparse.Namespace, task: str, histories: list[UserHistory], out: Path):
    """``compile --ray``: workers build the LMs and open the memory from these settings (``jobs.distributed``)."""
    from persona_dspy.jobs.distributed import MemorySpec, compile_on_ray
    from persona_dspy.lm.build import build_lm

    lm, optimizer = lm_configs(args)  # a file of servers is read here, once: workers get the URLs
    if lm.local:
        raise CLIError("--ray needs a model server every worker can reach (--lm <model> --api-base URL[,URL...], "
                       "e.g. `persona-dspy serve` for the local model) or --lm offline: the embedded model would "
                       "start one server per worker process")
    memory = MemorySpec(task, None if args.qdrant_url else str(args.memory or _default_memory()), args.qdrant_url,
                        os.environ.get("PERSONA_DSPY_QDRANT_API_KEY"), args.dense)
    with INTERRUPTS.graceful() as interrupt:
        logger.info("compiling %s into %s on Ray (%s)", plural(len(histories), "user"), out, args.ray)
        summary = compile_on_ray(histories, compile_config(args, out), lm=lm, memory=memory, optimizer_lm=optimizer,
                                 address=args.ray, processes=args.ray_processes, batch=args.ray_batch,
                                 progress=progress_flag(args), interrupt=interrupt)
    return build_lm(lm), summary


def _default_memory() -> Path:
    from persona_dspy.memory.episodic import default_memory_path

    return default_memory_path()


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every optimizer on the same users, trainsets and validation slices; write JSON and CSV."""
    from persona_dspy.files import home

    task, histories = task_histories(args)
    lm, optimizer_lm = build_lms(args)
    from persona_dspy.jobs.comparison import compare_optimizers

    out = args.out if args.out is not None else home() / "reports" / f"compare-{task}"
    with open_memory(task, args) as memory:
        ingest_histories(memory, histories, args)
        logger.info("comparing %s on %s", plural(len(args.optimizers), "optimizer"), plural(len(histories), "user"))
        report = compare_optimizers(histories, memory=memory, lm=lm, optimizer_lm=optimizer_lm,
                                    optimizers=tuple(args.optimizers), n_recent=args.recent, k=args.k,
                                    seed=args.seed, progress=progress_flag(args))
    print(report.table())
    for kind, path in report.save(out).items():
        print(f"{kind}: {path}")
    check_strict(report.output_totals, args)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the aligner's settings on dev users with Optuna (SQLite study, resumable)."""
    from persona_dspy.files import home

    task, histories = task_histories(args)
    # Checked before the study starts: each trial builds its own LM, at the trial's temperature.
    lm, optimizer = lm_configs(args)
    import optuna

    from persona_dspy.files import write_atomically
    from persona_dspy.jobs.tuning import run_tuning

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one log line per trial is noise next to the summary
    storage = args.storage or f"sqlite:///{home() / 'tuning.db'}"
    with open_memory(task, args) as memory:
        ingest_histories(memory, histories, args)
        logger.info("tuning: %s in %s", plural(args.n_trials, "trial"), storage)
        summary = run_tuning(
            task, histories, memory, lm=lm, optimizer_lm=optimizer, storage=storage,
            study_name=args.study_name or f"tune-{task}-{args.mode}", n_trials=args.n_trials,
            max_lm_calls_per_user=args.max_calls_per_user, multi_objective=args.multi_objective,
            algorithm=args.sampler, seed=args.seed, n_recent=args.recent, mode=args.mode, workers=args.workers,
            progress=progress_flag(args),
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
    check_strict(summary["output_totals"], args)
    return 1 if summary.get("no_best_reason") else 0
