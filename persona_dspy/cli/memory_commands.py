"""Commands on stored memory and what exists per user: ``ingest``, ``retrieval-eval``,
``memory delete|rebuild|copy`` and ``users``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from persona_dspy.cli.errors import CLIError
from persona_dspy.cli.task_data import (
    ingest_histories,
    load_task_data,
    open_memory,
    programs_dir,
    selected_tasks,
    selected_users,
    task_histories,
)
from persona_dspy.console import plural

logger = logging.getLogger(__name__)


def cmd_ingest(args: argparse.Namespace) -> int:
    for task in selected_tasks(args):
        histories = selected_users(load_task_data(task, args), args)
        with open_memory(task, args) as memory:
            written = ingest_histories(memory, histories, args)
            print(f"{task}: {plural(len(histories), 'user')}, {plural(written, 'item')} written, "
                  f"{memory.count()} stored at {memory.location} ({memory.embedder.config.label}, {memory.layout})")
    return 0


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    """Ingest (idempotent) and print how well a k-nearest vote over each query's own profile does."""
    from persona_dspy.evaluation.retrieval_quality import evaluate_retrieval

    rows = []
    for task in selected_tasks(args):
        histories = selected_users(load_task_data(task, args), args)
        with open_memory(task, args) as memory:
            ingest_histories(memory, histories, args)
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


def _memory_location(task: str, args: argparse.Namespace) -> str | None:
    """Where the task's memory is, or None when there is none yet (so that looking never creates one)."""
    if args.qdrant_url:
        return args.qdrant_url
    if args.memory == ":memory:":
        return None
    from persona_dspy.files import home

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
    task, histories = task_histories(args)
    from persona_dspy.programs import find_program

    location = _memory_location(task, args)
    stored: dict[str, int] = {}
    if location is not None:
        with open_memory(task, args) as memory:
            stored = {h.user_id: memory.count(h.user_id) for h in histories}
    folder = programs_dir(task, args)
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
    task, histories = task_histories(args)
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
    if args.action == "rebuild" and not args.qdrant_url:  # built beside the old memory, then swapped in
        from persona_dspy.memory.embeddings import EmbeddingConfig
        from persona_dspy.memory.rebuild import rebuild_memory

        rebuild_memory(Path(location), task, histories, EmbeddingConfig(sparse=True, dense=args.dense),
                       lambda memory, selected: ingest_histories(memory, selected, args))
    with open_memory(task, args) as memory:
        if args.action == "delete" or args.qdrant_url:  # a server's memory is rebuilt in place
            for user in users:
                memory.delete_user(user)
                logger.info("deleted the memory of %s", user)
            if args.action == "rebuild":
                ingest_histories(memory, histories, args)
        print(f"{'deleted' if args.action == 'delete' else 'rebuilt'}: {plural(len(users), 'user')} at {location} "
              f"({memory.count()} items stored for {task} now, {memory.embedder.config.label})")
    return 0
