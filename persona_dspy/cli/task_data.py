"""A task's users, memory and compiled-program folder as the flags select them, shared by the commands.

The data is read before any LM is built, so that a data error costs no model start and imports nothing heavy."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from persona_dspy.cli.arguments import SHIPPED_TASKS, progress_flag
from persona_dspy.cli.errors import CLIError
from persona_dspy.console import plural

if TYPE_CHECKING:  # imported lazily, so that `--help` and data errors stay fast
    from persona_dspy.data.records import UserHistory
    from persona_dspy.memory.episodic import EpisodicMemory

logger = logging.getLogger(__name__)


def selected_users(histories: list[UserHistory], args: argparse.Namespace) -> list[UserHistory]:
    from persona_dspy.data.records import select_users

    return select_users(histories, args.users, args.max_users)


_NOTED_TASK_NAMES: set[str] = set()


def _task_name(given: str) -> str:
    """The registry name of ``--task`` ('LaMP3', 'lamp_3', '3' -> LaMP_3), said once when it differs from the given."""
    from persona_dspy.data.tasks import normalize_task_name

    task = normalize_task_name(given)
    if task != given and given not in _NOTED_TASK_NAMES:
        _NOTED_TASK_NAMES.add(given)
        print(f"persona-dspy: note: --task {given!r} read as {task}", file=sys.stderr)
    return task


def selected_tasks(args: argparse.Namespace) -> list[str]:
    if args.task == "all":
        if args.data is not None:
            raise CLIError("--data needs a single --task")
        return list(SHIPPED_TASKS)
    return [_task_name(args.task)]


def data_folder(task: str, args: argparse.Namespace) -> Path:
    from persona_dspy.data.lamp import dataset_dir

    return args.data if args.data is not None else dataset_dir(task)


def load_task_data(task: str, args: argparse.Namespace):
    from persona_dspy.data.lamp import load_dataset

    folder = data_folder(task, args)
    histories = load_dataset(folder, split=args.split)
    if histories and task != "LaMP_2" and histories[0].task != task:
        raise ValueError(f"{folder} holds {histories[0].task}, not {task}")
    return histories


def open_memory(task: str, args: argparse.Namespace):
    from persona_dspy.memory.embeddings import EmbeddingConfig
    from persona_dspy.memory.episodic import EpisodicMemory

    config = EmbeddingConfig(sparse=True, dense=args.dense)
    if args.qdrant_url:
        return EpisodicMemory.for_task(task, url=args.qdrant_url, embedding=config)
    return EpisodicMemory.for_task(task, args.memory, embedding=config)


def ingest_histories(memory: EpisodicMemory, histories: list[UserHistory], args: argparse.Namespace) -> int:
    """Store the users' histories, a bar step per user (idempotent: items already stored as they are cost nothing)."""
    from persona_dspy.console import progress_bar

    task = histories[0].task if histories else "memory"
    logger.info("ingesting %s into %s (%s)", plural(len(histories), "user"), memory.location,
                memory.embedder.config.label)
    written = 0
    with progress_bar(len(histories), f"ingest {task}", progress_flag(args)) as bar:
        for history in histories:
            written += memory.add_histories([history])
            bar.update(1)
    logger.info("ingested: %s written", plural(written, "item"))
    return written


def task_histories(args: argparse.Namespace) -> tuple[str, list[UserHistory]]:
    """One task's users: the task name (LaMP_2 resolved from the data) and its histories, selected by the flags.

    Read before any LM is built, so that a data error costs no model start and imports nothing heavy.
    """
    task = _task_name(args.task)
    logger.info("reading the %s data from %s", task, data_folder(task, args))
    histories = load_task_data(task, args)
    if not histories:
        raise CLIError(f"no users in the {task} data")
    if hasattr(args, "max_users"):
        histories = selected_users(histories, args)
    return histories[0].task, histories


def programs_dir(task: str, args: argparse.Namespace) -> Path:
    from persona_dspy.programs import default_programs_dir

    return args.programs if args.programs is not None else default_programs_dir(task)
