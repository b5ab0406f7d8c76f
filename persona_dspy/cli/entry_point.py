"""``main``: parse (``compile --settings`` supplies defaults), set up logging, run the command under the interrupt
handler, map user errors to one line and exit 2, and stop any embedded model server the command started."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Sequence

from persona_dspy.cli.compile_settings import settings_defaults
from persona_dspy.cli.errors import CLIError, user_errors
from persona_dspy.cli.interrupts import INTERRUPTS
from persona_dspy.cli.parser import build_parser
from persona_dspy.cli.repeated_warnings import RepeatedWarnings, install

STOP_DEADLINE = 10.0
"""Seconds after a signal's stop began by which the process ends, whatever hangs (a watchdog thread in C)."""


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


def _configure_logging(args: argparse.Namespace) -> RepeatedWarnings | None:
    level = logging.ERROR if args.quiet else {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    return install(args.verbose, args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    repeats = _configure_logging(args)
    local = sys.modules.get("persona_dspy.lm.local_server")
    callers_servers = local.running() if local is not None else frozenset()
    code = 2
    try:
        with INTERRUPTS.installed():
            code = args.func(args)
    except KeyboardInterrupt:
        print("\npersona-dspy: interrupted", file=sys.stderr)
        code = INTERRUPTS.exit_code
    except BrokenPipeError:  # `persona-dspy users | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        print(f"persona-dspy: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        line = repeats.summary() if repeats is not None else None
        if repeats is not None:
            repeats.remove()
        if line:
            print(line, file=sys.stderr)
        code = _stop_servers(callers_servers, code)
    return code


def _stop_servers(keep: frozenset, code: int) -> int:
    """Stop the embedded model servers the command started (also on Ctrl-C and errors); after a signal, exit now.

    In-flight requests are cancelled first (``lm.local_server.LocalServer.stop``). After a signal nothing waits for
    llama.cpp to let go of them: a server still serving is left to end with the process, which exits at once when
    such a server or users' threads still waiting on LM calls remain (the interpreter would join them); a watchdog
    that needs no Python thread ends it regardless if stopping ever hangs.
    """
    local = sys.modules.get("persona_dspy.lm.local_server")
    signalled = INTERRUPTS.first is not None or code in (130, 143)
    if signalled:
        faulthandler.dump_traceback_later(STOP_DEADLINE, exit=True)  # a last resort: never hang after Ctrl-C
    stopped = local.stop_all(keep=keep, wait=0.0 if signalled else 10.0) if local is not None else True
    if signalled:
        faulthandler.cancel_dump_traceback_later()
        if not stopped or _lingering_workers():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _lingering_workers() -> bool:
    return any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread())
