"""The task and optimizer LMs built from the flags, the hint that explains an LM error, and ``--strict``."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from persona_dspy.cli.arguments import _server_options
from persona_dspy.cli.errors import CLIError

if TYPE_CHECKING:  # imported lazily, so that `--help` and data errors stay fast
    import dspy

logger = logging.getLogger(__name__)


def _build_lm(args: argparse.Namespace) -> dspy.LM:
    """The LM the flags (or PERSONA_DSPY_* variables) name, else the embedded local model; built before any call."""
    from persona_dspy.lm.build import build_lm

    logger.info("building the LM (%s)", args.lm or os.environ.get("PERSONA_DSPY_LM") or "local: starts the model")
    lm = build_lm(args.lm, args.api_base, api_key=args.api_key, temperature=getattr(args, "temperature", 0.0),
                  max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries,
                  server=_server_options(args), max_in_flight=args.max_in_flight)
    if lm.kwargs.get("api_base"):
        import litellm

        litellm.suppress_debug_info = True  # its "Give Feedback / Get Help" banner is noise next to our one-line errors
    from persona_dspy.cli.repeated_warnings import cover_dspy
    from persona_dspy.lm.server_fit import fit_to_server

    cover_dspy()  # dspy, imported by now, has added its log handler
    fit_to_server(lm, args)
    return lm


def _build_optimizer_lm(args: argparse.Namespace, task_lm: dspy.LM) -> dspy.LM:
    """The LM for loss, updates and reflection: --optimizer-lm (or its env variable), else the task LM itself."""
    from persona_dspy.lm.build import build_optimizer_lm

    return build_optimizer_lm(args.optimizer_lm, args.optimizer_api_base, task_lm=task_lm,
                              temperature=getattr(args, "temperature", 0.0), max_tokens=args.max_tokens,
                              timeout=args.timeout, num_retries=args.retries, server=_server_options(args))


def _lm_hint(lm: dspy.LM, error: object = "") -> str:
    """What the error says happened at the server (refused, timed out while busy, context overflow...)."""
    from persona_dspy.lm.server_fit import explain_lm_error

    return explain_lm_error(str(error), lm)


def _strict(totals: dict[str, Any], args: argparse.Namespace) -> None:
    """``--strict``: a run whose outputs were mostly invalid is an error (exit 2), not a result."""
    from persona_dspy.evaluation.output_counts import strict_failure

    message = strict_failure(totals, getattr(args, "strict", False))
    if message:
        raise CLIError(message)
