"""The ``persona-dspy`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SHIPPED_TASKS = ("LaMP_2N", "LaMP_3", "LaMP_2M")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="all",
                        help=f"LaMP task of a shipped sample ({', '.join(SHIPPED_TASKS)}) or 'all' (default)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder in LaMP layout ({split}_questions.json + {split}_outputs.json); "
                             "default: the sample shipped in data/<task>")
    parser.add_argument("--split", default="dev", help="file prefix inside --data (default: dev)")


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", default=None,
                        help="memory folder (Qdrant local mode), or ':memory:'; default $PERSONA_DSPY_HOME/memory")
    parser.add_argument("--qdrant-url", default=os.environ.get("PERSONA_DSPY_QDRANT_URL"),
                        help="a Qdrant server instead of a local folder (env PERSONA_DSPY_QDRANT_URL)")
    parser.add_argument("--dense", default=os.environ.get("PERSONA_DSPY_DENSE_MODEL"),
                        help="dense embedding model: a fastembed model name or a local ONNX folder, for hybrid "
                             "retrieval (env PERSONA_DSPY_DENSE_MODEL); default: BM25 only")


def _tasks(args: argparse.Namespace) -> list[str]:
    from persona_dspy.tasks import normalize_task_name

    if args.task == "all":
        if args.data is not None:
            raise SystemExit("--data needs a single --task")
        return list(SHIPPED_TASKS)
    return [normalize_task_name(args.task)]


def _load(task: str, args: argparse.Namespace):
    from persona_dspy.lamp import dataset_dir, load_dataset

    folder = args.data if args.data is not None else dataset_dir(task)
    histories = load_dataset(folder, split=args.split)
    if histories and task != "LaMP_2" and histories[0].task != task:
        raise ValueError(f"{folder} holds {histories[0].task}, not {task}")
    return histories


def _open_memory(task: str, args: argparse.Namespace):
    from persona_dspy.embeddings import EmbeddingConfig
    from persona_dspy.memory import EpisodicMemory

    config = EmbeddingConfig(sparse=True, dense=args.dense)
    prefix = f"pd_{task.lower()}"
    if args.qdrant_url:
        return EpisodicMemory(url=args.qdrant_url, embedding=config, prefix=prefix)
    return EpisodicMemory(args.memory, embedding=config, prefix=prefix)


def cmd_ingest(args: argparse.Namespace) -> int:
    for task in _tasks(args):
        histories = _load(task, args)
        with _open_memory(task, args) as memory:
            written = memory.add_histories(histories)
            print(f"{task}: {len(histories)} users, {written} items written, {memory.count()} stored "
                  f"at {memory.location} ({memory.embedder.config.label}, layout {memory.layout.name})")
    return 0


def cmd_retrieval_eval(args: argparse.Namespace) -> int:
    """Ingest (idempotent) and print how well a k-nearest vote over each query's own profile does."""
    from persona_dspy.retrieval_quality import evaluate_retrieval

    rows = []
    for task in _tasks(args):
        histories = _load(task, args)
        with _open_memory(task, args) as memory:
            memory.add_histories(histories)
            strategies = ["recency", "majority", "bm25"] + (["dense", "hybrid"] if memory.embedder.has_dense else [])
            for strategy in strategies:
                rows.append(evaluate_retrieval(histories, strategy, k=args.k, memory=memory).as_row())
    _print_table(rows, ["task", "strategy", "k", "queries", "accuracy", "mae", "rmse", "fallbacks"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from persona_dspy.embeddings import EmbeddingModelError
    from persona_dspy.lamp import DataError
    from persona_dspy.memory import MemoryStoreError

    try:
        return args.func(args)
    except (DataError, EmbeddingModelError, MemoryStoreError, ValueError) as exc:
        print(f"persona-dspy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
