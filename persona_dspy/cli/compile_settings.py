"""``compile --settings FILE``: the aligner settings of a file (``tune --out``'s best, or written by hand) as
compile's flag defaults, checked like the flags themselves."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from persona_dspy.cli.arguments import non_negative, non_negative_float, positive
from persona_dspy.cli.errors import CLIError

logger = logging.getLogger(__name__)


SETTINGS_FLAGS = {"batch_size": "batch_size", "iterations": "iterations", "k": "k", "temperature": "temperature",
                  "candidates_per_step": "candidates", "max_persona_words": "max_persona_words",
                  "n_recent": "recent", "recent": "recent", "mode": "mode"}
"""Keys a ``compile --settings`` file may hold (tune's ``best_settings``, or written by hand) -> compile's flags."""


def settings_defaults(path: Path, task: str | None) -> dict[str, Any]:
    """compile's flag defaults from a settings file: ``tune --out``'s summary (its best settings) or a flat object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CLIError(f"--settings {path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CLIError(f"--settings {path}: expected a JSON object")
    if "best_settings" in document:  # a `tune --out` summary
        if not document["best_settings"]:
            raise CLIError(f"--settings {path}: the study has no best settings ({document.get('no_best_reason')})")
        from persona_dspy.data.tasks import canonical_task_name

        if task and document.get("task") and document["task"] != (canonical_task_name(task) or task):
            logger.warning("--settings %s were tuned on %s, not %s", path, document["task"], task)
        settings = {**document["best_settings"], **(document.get("compile_settings") or {})}
    else:
        settings = document
    unknown = sorted(set(settings) - set(SETTINGS_FLAGS))
    if unknown:
        raise CLIError(f"--settings {path}: unknown setting(s) {', '.join(unknown)}; "
                       f"known: {', '.join(SETTINGS_FLAGS)}")
    checks = {"temperature": non_negative_float, "iterations": non_negative, "mode": str}
    defaults = {}
    for key, value in settings.items():
        flag = SETTINGS_FLAGS[key]
        try:
            defaults[flag] = checks.get(flag, positive(int))(str(value))
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"--settings {path}: {key}: {exc}") from exc
    if defaults.get("mode", "demos") not in ("demos", "rag", "react"):
        raise CLIError(f"--settings {path}: mode must be demos, rag or react, got {defaults['mode']!r}")
    return defaults
