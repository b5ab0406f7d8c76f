"""Build the small LaMP samples shipped as package data (persona_dspy/data/samples/) from the shared dev sets.

    python data/make_samples.py           # rebuild persona_dspy/data/samples/<task>/dev_{questions,outputs}.json
    python data/make_samples.py --check   # exit 1 if the shipped files differ from a rebuild

Reads ../shared/lamp/<task>/dev_{questions,outputs}.json (relative to the repository root; override
with --source). For each task a fixed number of users is taken, ranked by sha256(user_id) so the
choice is deterministic and independent of file order. Each question keeps its own profile, cut
to the MAX_PROFILE most recent items. Cutting a profile never adds anything to it, so the leakage
property of the source holds: a query's profile is still only items strictly earlier than the
query. The files keep the official LaMP questions/outputs format (plus "user_id"). Standard
library only, so it runs without the package installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "persona_dspy" / "data" / "samples"
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "lamp"
DEFAULT_OUT = SAMPLES

USERS_PER_TASK: dict[str, int] = {"LaMP_2N": 6, "LaMP_3": 6, "LaMP_2M": 3}
MAX_PROFILE = 60
SPLIT = "dev"


def _rank(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def _trim(profile: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most recent items (by date, then file order), in their original order."""
    if len(profile) <= limit:
        return list(profile)
    order = sorted(range(len(profile)), key=lambda i: (str(profile[i].get("date", "")), i))
    keep = set(order[-limit:])
    return [item for i, item in enumerate(profile) if i in keep]


def sample_task(source: Path, task: str, n_users: int, max_profile: int = MAX_PROFILE
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sampled questions and outputs of one task (not written)."""
    questions = json.loads((source / task / f"{SPLIT}_questions.json").read_text(encoding="utf-8"))
    outputs = json.loads((source / task / f"{SPLIT}_outputs.json").read_text(encoding="utf-8"))
    user_ids = sorted({q["user_id"] for q in questions}, key=_rank)
    if len(user_ids) < n_users:
        raise SystemExit(f"{task}: only {len(user_ids)} users, {n_users} wanted")
    chosen = set(user_ids[:n_users])
    sampled = [dict(q, profile=_trim(q["profile"], max_profile)) for q in questions if q["user_id"] in chosen]
    ids = {q["id"] for q in sampled}
    golds = [g for g in outputs["golds"] if g["id"] in ids]
    return sampled, {"task": outputs["task"], "golds": golds}


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def build(source: Path = DEFAULT_SOURCE, out: Path = DEFAULT_OUT) -> dict[Path, bytes]:
    """Every file of the samples, by path under ``out`` (nothing written)."""
    files: dict[Path, bytes] = {}
    for task, n_users in USERS_PER_TASK.items():
        questions, outputs = sample_task(source, task, n_users)
        files[out / task / f"{SPLIT}_questions.json"] = _dump(questions)
        files[out / task / f"{SPLIT}_outputs.json"] = _dump(outputs)
        files[out / task / "SOURCE_README.md"] = (source / task / "README.md").read_bytes()
    return files


def write(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="shared LaMP folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.source.is_dir():
        logger.error("source folder not found: %s", args.source)
        return 2
    files = build(args.source, args.out)
    if args.check:
        stale = [p for p, data in files.items() if not p.is_file() or p.read_bytes() != data]
        for path in stale:
            logger.error("differs from a rebuild: %s", path)
        return 1 if stale else 0
    for task in USERS_PER_TASK:
        shutil.rmtree(args.out / task, ignore_errors=True)
    write(files)
    for path, data in files.items():
        logger.info("%8d bytes  %s", len(data), path)
    logger.info("%8d bytes  total", sum(len(d) for d in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
