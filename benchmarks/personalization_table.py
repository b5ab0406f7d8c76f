"""The personalization table in Markdown: one renderer for the benchmark's own output, the README and the docs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_dspy.evaluation.metrics import primary_metric  # noqa: E402

NAMES = {"non_personalized": "non-personalized", "initial_persona": "initial persona",
         "initial_lm_only": "initial persona, the model's answer alone", "persona_aligner": "PersonaAligner",
         "memory_vote": "memory vote (no LM)", "majority": "the user's majority label (no LM)",
         "dense_vote": "dense 5-nearest vote (no LM)"}
LM_FREE = {"memory_vote", "majority", "dense_vote"}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of ``benchmarks/results/personalization.json``'s rows: one block of rows per task."""
    lines = ["| task (metric) | method | users | value [95% CI] | LM calls | prompt / completion tokens | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        first = row is next(r for r in rows if r["task"] == row["task"])
        _, higher = primary_metric(row["task"])
        task = f"{row['task']} ({row['metric'].upper() if row['metric'] == 'mae' else row['metric']}"
        task += ")" if higher else ", lower is better)"
        lm = row["method"] not in LM_FREE
        tokens = f"{row['prompt_tokens_per_user']:,.0f} / {row['completion_tokens_per_user']:,.0f}" if lm else "0"
        lines.append(f"| {task if first else ''} | {NAMES[row['method']]} | {row['users']} | "
                     f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | "
                     f"{row['calls_per_user']:.1f} | {tokens} | {row['seconds_per_user']:.1f} |")
    return "\n".join(lines)
