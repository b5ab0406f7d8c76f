"""The personas the personalization benchmark saved hold no junk: repetition, copied history or a placeholder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from persona_dspy.data.lamp import load_dataset
from persona_dspy.outputs.validation import rejection

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "personalization.jsonl"
SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", REPO.parent / "shared"))


def test_no_benchmark_persona_holds_junk():
    if not (SHARED / "lamp").is_dir():
        pytest.skip(f"the shared dev sets are absent ({SHARED / 'lamp'})")
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    histories = {}
    checked = 0
    for record in records:
        if "personas" not in record:
            continue
        task = record["task"]
        if task not in histories:
            histories[task] = {h.user_id: h for h in load_dataset(SHARED / "lamp" / task)}
        texts = [item.text for item in histories[task][record["user_id"]].items]
        for kind in ("initial_summary", "aligned_summary"):
            summary = record["personas"][kind]
            assert rejection(summary, copied_from=texts) is None, (record["user_id"], kind, summary)
            checked += 1
    assert checked >= 2 * len([r for r in records if "failed" not in r])
