"""The task and optimizer LMs built from the flags, the hint that explains an LM error, and ``--strict``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from persona_dspy.cli.arguments import server_options
from persona_dspy.cli.errors import CLIError

if TYPE_CHECKING:  # imported lazily, so that `--help` and data errors stay fast
    import dspy

    from persona_dspy.lm.config import LMConfig

logger = logging.getLogger(__name__)


def lm_configs(args: argparse.Namespace) -> tuple[LMConfig, LMConfig | None]:
    """The task LM's configuration (flags, then PERSONA_DSPY_* variables, then the embedded local model), fitted to
    its server, and the optimizer LM's (None: the task LM). Fitting may lower ``args.workers`` (said on stderr)."""
    from persona_dspy.lm.config import lm_config, optimizer_lm_config
    from persona_dspy.lm.server_fit import fit_to_server, watch_servers

    task = lm_config(args.lm, args.api_base, api_key=args.api_key, temperature=getattr(args, "temperature", None),
                     max_tokens=args.max_tokens, timeout=args.timeout, num_retries=args.retries,
                     server=server_options(args), max_in_flight=args.max_in_flight,
                     context_tokens=args.context_tokens)
    optimizer = optimizer_lm_config(args.optimizer_lm, args.optimizer_api_base, like=task) \
        if hasattr(args, "optimizer_lm") else None
    fit = fit_to_server(task, getattr(args, "workers", None))
    if fit.note:
        print(f"persona-dspy: note: {fit.note}", file=sys.stderr)
    if fit.workers is not None:
        args.workers = fit.workers
    watch_servers(task)  # hedged requests, and a loopback server's timeout following its latency
    return task, optimizer


def build_task_lm(args: argparse.Namespace, config: LMConfig | None = None) -> dspy.LM:
    """The task LM (``config``, else the one the flags name), built before any call."""
    from persona_dspy.lm.build import build_lm

    config = config if config is not None else lm_configs(args)[0]
    logger.info("building the LM (%s)", "local: starts the model" if config.local else config.model)
    lm = build_lm(config)
    if lm.kwargs.get("api_base") or config.servers:
        import litellm

        litellm.suppress_debug_info = True  # its "Give Feedback / Get Help" banner is noise next to our one-line errors
    from persona_dspy.cli.repeated_warnings import cover_dspy

    cover_dspy()  # dspy, imported by now, has added its log handler
    return lm


def build_lms(args: argparse.Namespace) -> tuple[dspy.LM, dspy.LM]:
    """The task LM and the LM for loss, updates and reflection (--optimizer-lm, else the task LM itself)."""
    from persona_dspy.lm.build import build_lm

    task, optimizer = lm_configs(args)
    lm = build_task_lm(args, task)
    return lm, (build_lm(optimizer) if optimizer is not None else lm)


def lm_hint(lm: dspy.LM, error: object = "") -> str:
    """What the error says happened at the server (refused, timed out while busy, context overflow...)."""
    from persona_dspy.lm.server_fit import explain_lm_error

    return explain_lm_error(str(error), lm)


def check_strict(totals: dict[str, Any], args: argparse.Namespace) -> None:
    """``--strict``: a run whose outputs were mostly invalid is an error (exit 2), not a result."""
    from persona_dspy.evaluation.output_counts import strict_failure

    message = strict_failure(totals, getattr(args, "strict", False))
    if message:
        raise CLIError(message)
