"""How memory should reach a small model: PersonaAgent's retrieval forms and settings, on every dev query.

For each setting (mode, k, retrieval, chain of thought, demonstration order, item length) the agent answers every
query of the shared LaMP dev sets with the default local model and a persona that holds only the template (the
persona's own effect is measured by ``personalization.py``). Memory-only votes over the same retrieval are printed
beside. Results: ``benchmarks/results/demos_study.json``; the agent's defaults are chosen from this table.

    python benchmarks/demos_study.py --tasks LaMP_2N --settings demos-k5-dense demos-k5-bm25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import dspy

from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.data.examples import query_examples
from persona_dspy.data.lamp import load_dataset
from persona_dspy.evaluation.metrics import aggregate_by_user, primary_metric
from persona_dspy.files import write_atomically
from persona_dspy.lm.adapters import default_adapter
from persona_dspy.lm.build import build_lm, describe_lm
from persona_dspy.lm.usage import LMUsage
from persona_dspy.memory.embeddings import EmbeddingConfig
from persona_dspy.memory.episodic import EpisodicMemory

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO.parent / "shared" / "models" / "all-MiniLM-L6-v2-onnx"
SEARCH = {"bm25": "sparse", "dense": "dense", "hybrid": "hybrid"}


class SimilarFirst(PersonaAgent):
    """The same agent with its demonstrations in the other order (most similar first)."""

    def demonstrations(self, passages):  # noqa: ANN001, ANN201
        return list(reversed(super().demonstrations(passages)))


def parse(name: str) -> dict[str, Any]:
    """``demos-k5-dense[-cot][-first][-c300]`` or ``rag-k5-bm25`` -> agent options."""
    parts = name.split("-")
    options: dict[str, Any] = {"mode": parts[0], "k": int(parts[1][1:]), "search_mode": SEARCH[parts[2]]}
    for part in parts[3:]:
        if part == "cot":
            options["reasoning"] = True
        elif part == "first":
            options["first"] = True
        elif part.startswith("c"):
            options["demo_chars"] = int(part[1:])
        else:
            raise ValueError(f"unknown setting part {part!r} in {name!r}")
    return options


def run(task: str, setting: str, histories, memory: EpisodicMemory, lm: dspy.LM) -> dict[str, Any]:  # noqa: ANN001
    options = parse(setting)
    cls = SimilarFirst if options.pop("first", False) else PersonaAgent
    rows, usage, started = [], LMUsage(), time.perf_counter()
    with dspy.context(lm=lm, adapter=default_adapter()), usage.counting():
        for history in histories:
            agent = cls(task, memory, user_id=history.user_id, **options)
            for example in query_examples(history):
                prediction = agent(**example.inputs())
                rows.append((history.user_id, str(prediction.answer), str(example.answer)))
    overall = aggregate_by_user(task, rows)["overall"]
    key, _ = primary_metric(task)
    snap = usage.snapshot()
    return {"task": task, "setting": setting, "queries": len(rows), "metric": key, "value": overall[key],
            "metrics": overall, "calls": snap["calls"],
            "prompt_tokens_per_call": snap["prompt_tokens"] / max(1, snap["calls"]),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["LaMP_2N", "LaMP_3", "LaMP_2M"])
    parser.add_argument("--settings", nargs="+", default=["demos-k5-dense"])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "lamp")
    parser.add_argument("--max-users", type=int, default=None)
    parser.add_argument("--no-prompt-cache", action="store_true",
                        help="turn llama.cpp's prompt cache off (measured: SmolLM2 then often answers the first label)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "demos_study.json")
    args = parser.parse_args(argv)
    parser_cache = args.no_prompt_cache
    lm = build_lm("local", max_tokens=256, server={"slots": 1, "prompt_cache": not parser_cache})
    results = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for task in args.tasks:
        histories = load_dataset(args.data_root / task)[: args.max_users]
        memory = EpisodicMemory(":memory:", embedding=EmbeddingConfig(sparse=True, dense=str(DENSE)))
        memory.add_histories(histories)
        for setting in args.settings:
            row = run(task, setting, histories, memory, lm)
            row["users"] = len(histories)
            row["prompt_cache"] = not parser_cache
            print(json.dumps(row), flush=True)
            key = (task, setting, len(histories))
            results = [r for r in results if (r["task"], r["setting"], r.get("users")) != key]
            results.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(args.out, (json.dumps({"lm": describe_lm(lm), "rows": results}, indent=1) + "\n").encode())
        memory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
