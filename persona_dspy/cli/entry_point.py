"""``main``: parse (``compile --settings`` supplies defaults), set up logging, run the command under the interrupt
handler, map user errors to one line and exit 2, and stop any embedded model server the command started."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence

from persona_dspy.cli.compile_settings import settings_defaults
from persona_dspy.cli.errors import CLIError, user_errors
from persona_dspy.cli.interrupts import INTERRUPTS
from persona_dspy.cli.parser import build_parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``compile --settings FILE`` makes the file's values the defaults, so explicit flags still win."""
    args = parser.parse_args(argv)
    if getattr(args, "settings", None) is not None:
        try:
            defaults = settings_defaults(args.settings, args.task)
        except CLIError as exc:
            parser.exit(2, f"persona-dspy: error: {exc}\n")
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    _configure_logging(args)
    local = sys.modules.get("persona_dspy.lm.local_server")
    callers_servers = local.running() if local is not None else frozenset()
    code = 2
    try:
        with INTERRUPTS.installed():
            code = args.func(args)
    except KeyboardInterrupt:
        print("\npersona-dspy: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `persona-dspy users | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(f"persona-dspy: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        local = sys.modules.get("persona_dspy.lm.local_server")
        if local is not None:  # an embedded model server ends with the command, whatever happened
            local.stop_all(keep=callers_servers)
    if code == 130 and _lingering_workers():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # abandoned users' threads wait on LM calls; the interpreter would join them at exit
    return code


def _lingering_workers() -> bool:
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread())
