"""The flags the commands share, their validators, and the embedded server's options built from them.

Nothing here imports more than the standard library: ``--help`` and a usage error must stay fast."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHIPPED_TASKS = ("LaMP_2N", "LaMP_3", "LaMP_2M")


def add_data_args(parser: argparse.ArgumentParser, single_task: bool = False) -> None:
    if single_task:
        parser.add_argument("--task", required=True,
                            help=f"LaMP task, e.g. one of the shipped samples ({', '.join(SHIPPED_TASKS)})")
    else:
        parser.add_argument("--task", default="all",
                            help=f"LaMP task of a shipped sample ({', '.join(SHIPPED_TASKS)}) or 'all' (default)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder in LaMP layout ({split}_questions.json + {split}_outputs.json); "
                             "default: the sample shipped with the package")
    parser.add_argument("--split", default="dev", help="file prefix inside --data (default: dev)")


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", default=None,
                        help="memory folder (Qdrant Edge), ':memory:' (temporary); default $PERSONA_DSPY_HOME/memory")
    parser.add_argument("--qdrant-url", default=os.environ.get("PERSONA_DSPY_QDRANT_URL"),
                        help="a Qdrant server instead of a local folder (env PERSONA_DSPY_QDRANT_URL)")
    parser.add_argument("--dense", default=os.environ.get("PERSONA_DSPY_DENSE_MODEL"),
                        help="dense embedding model: a fastembed model name or a local ONNX folder, for hybrid "
                             "retrieval (env PERSONA_DSPY_DENSE_MODEL); default: BM25 only")


def _add_lm_args(parser: argparse.ArgumentParser, temperature: bool = True) -> None:
    """The task LM's flags; ``temperature=False`` for commands that set it themselves (tune searches it)."""
    parser.add_argument("--lm", default=None,
                        help="'local' (default: embedded llama.cpp serving SmolLM2-135M-Instruct, fetched once), "
                             "local/<path.gguf>, openai/<model> or hosted_vllm/<model> with --api-base, "
                             "ollama_chat/<model>, or 'offline' (the stand-in: a plumbing check, never a model); "
                             "env PERSONA_DSPY_LM")
    parser.add_argument("--api-base", default=None,
                        help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (env PERSONA_DSPY_API_BASE)")
    parser.add_argument("--api-key", default=None,
                        help="API key (prefer env PERSONA_DSPY_API_KEY: command lines end up in shell history)")
    if temperature:
        parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                            help="sampling temperature (default 0)")
    parser.add_argument("--max-tokens", type=positive(int), default=512,
                        help="completion token cap per call (default 512)")
    parser.add_argument("--timeout", type=positive(float), default=None,
                        help="seconds an LM request may wait for its reply (default 60; 600 for the embedded "
                             "model, whose requests queue for one CPU; for another server on this machine, once its "
                             "latency is known, 20x its p95 latency times the requests queued per slot it reports at "
                             "/props, between 10 and 60). A request a server (not the embedded one) sits on for 2x "
                             "its p95 latency, at least 0.25 s, is sent again (up to 4 copies, at doubling "
                             "intervals) and the first reply taken")
    parser.add_argument("--retries", type=non_negative, default=3,
                        help="retries of a failed LM request, with backoff (default 3)")
    parser.add_argument("--context-tokens", type=positive(int), default=None,
                        help="the model's context size in tokens, for a server that does not report it (llama.cpp "
                             "reports it at /props, vLLM at /v1/models); prompts are fitted to it")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 2) when most of the model's outputs were invalid, instead of a warning")
    parser.add_argument("--max-in-flight", type=positive(int), default=None, metavar="N",
                        help="with several servers in --api-base (URL,URL,... or a file of URLs): calls in flight "
                             "per server (default 16)")
    add_server_args(parser)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """How the embedded llama.cpp server runs (--lm local and `serve`)."""
    group = parser.add_argument_group("embedded model server (--lm local)")
    group.add_argument("--server-slots", type=positive(int), default=None,
                       help="requests served at once (default 1: on a CPU more slots add no throughput, only memory; "
                            "users in parallel are capped at the slots)")
    group.add_argument("--server-threads", type=positive(int), default=None,
                       help="llama.cpp threads (default: cores - 1, at least 1; 2 is faster on an idle 2-core machine)")
    group.add_argument("--server-context", type=positive(int), default=None,
                       help="context tokens per slot (default 4096: the largest prompt a LaMP compile builds plus "
                            "the reply, with room; SmolLM2 takes up to 8192)")
    group.add_argument("--server-cache-mib", dest="server_cache_mib", type=non_negative, default=None,
                       help="host memory for llama.cpp's cache of earlier prompts, MiB (default 256; 0: none)")
    group.add_argument("--server-port", type=non_negative, default=None, help="port on 127.0.0.1 (default: free)")
    group.add_argument("--gpu-layers", type=int, default=None, help="layers offloaded to a GPU build (default 0)")
    group.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false", default=None,
                       help="recompute every prompt: slower, but a prompt sent twice at temperature 0 gets the same "
                            "answer (llama.cpp's reused prompt cache can change one)")


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The embedded server's settings from the flags (``ServerSettings``' defaults for those not given)."""
    options = {"slots": args.server_slots, "threads": args.server_threads, "context_per_slot": args.server_context,
               "port": args.server_port, "gpu_layers": args.gpu_layers, "prompt_cache": args.prompt_cache,
               "cache_ram_mib": args.server_cache_mib}
    return {key: value for key, value in options.items() if value is not None}


def add_optimizer_lm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer-lm", default=None,
                        help="a separate LM for textual loss, persona updates and reflection "
                             "(env PERSONA_DSPY_OPTIMIZER_LM; default: the task LM)")
    parser.add_argument("--optimizer-api-base", default=None, help="its server (env PERSONA_DSPY_OPTIMIZER_API_BASE)")


def add_user_args(parser: argparse.ArgumentParser) -> None:
    """The same user selection on every per-user command."""
    parser.add_argument("--users", nargs="+", default=None, metavar="ID", help="only these user ids")
    parser.add_argument("--max-users", type=positive(int), default=None, metavar="N",
                        help="at most N users (the first in dataset order)")


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """The one progress rule: bars on stderr when it is a terminal, unless --progress or --no-progress says."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a terminal)")


def progress_flag(args: argparse.Namespace) -> bool | None:
    return False if getattr(args, "quiet", False) and args.progress is None else args.progress


def _verbosity_parent() -> argparse.ArgumentParser:
    """-v/-q accepted after the subcommand too (SUPPRESS: an absent flag does not undo one given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log each stage (-vv: debug)")
    parent.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="errors only: no warnings, no progress bars")
    return parent


def _number(kind: type[int] | type[float], *, zero: bool) -> Callable[[str], Any]:
    """A number flag's parser: ``kind`` (int or float), positive, or 0 or more with ``zero``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from exc
        if not (value >= 0 if zero else value > 0):  # written so that a NaN is refused too
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'positive'}, got {text}")
        return value

    return parse


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    return _number(kind, zero=False)


non_negative_float = _number(float, zero=True)
non_negative = _number(int, zero=True)


def task_command(sub: Any, name: str, help: str, *, temperature: bool = True) -> argparse.ArgumentParser:
    """A command that answers with an LM on one task's data and memory: the flags they all share."""
    parser = subcommand(sub, name, help)
    add_data_args(parser, single_task=True)
    add_memory_args(parser)
    _add_lm_args(parser, temperature=temperature)
    return parser


def subcommand(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, parents=[_verbosity_parent()])


def add_program_args(parser: argparse.ArgumentParser, initial: bool = True) -> None:
    """Where compiled programs are looked up (each user's by ``programs.program_path``)."""
    parser.add_argument("--programs", type=Path, default=None, metavar="DIR",
                        help="compiled programs folder (default $PERSONA_DSPY_HOME/programs/<task>, where compile "
                             "saves)")
    if initial:
        parser.add_argument("--initial", action="store_true",
                            help="answer with the initial persona even where a compiled program exists")
