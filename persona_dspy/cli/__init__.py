"""The ``persona-dspy`` command line.

Commands: ``ingest`` (a dataset into per-user memory), ``memory copy`` (between stores), ``retrieval-eval`` (how
well memory alone predicts),
``eval`` (PersonaAgent over a dataset, LaMP metrics, a JSON report), ``predict`` (one query of one user) and
``compile`` (align every user's persona and save their program files), ``compare`` (the aligner against DSPy's
optimizers), ``tune`` (search the aligner's settings with Optuna), ``users`` (what exists per user: data, memory,
program) and ``memory`` (delete or rebuild users' stored memory).
Every failure the user can fix is reported as ``persona-dspy: error: ...`` on stderr with exit code 2, no
traceback; ``eval`` and ``compile`` exit 1 when some (not all) users failed. Ctrl-C exits 130, SIGTERM 143: ``eval``
and ``compile`` first stop starting users, give those in flight two seconds and write what completed; requests still
in flight are cancelled (``lm.cancel``); a second signal exits at once. Repeated warnings are counted, not repeated
(``repeated_warnings``).

Start-up stays fast: this package and everything a usage, data or task error needs import no dspy, litellm, qdrant,
fastembed or llama.cpp (a test checks it); each command imports what it uses, after the data has been read.

Modules, in the order a run meets them: ``entry_point`` (``main``: logging, error mapping, exit codes), ``parser``
(every command and its flags), ``arguments`` (shared flags and validators), ``compile_settings``
(``compile --settings``), ``task_data`` (the users, memory and programs the flags select), ``lm_options`` (the LMs,
error hints, ``--strict``), ``interrupts`` (Ctrl-C), ``repeated_warnings``, ``errors`` (``CLIError``), and the commands:
``memory_commands``, ``answer_commands``, ``optimize_commands``, ``server_commands``.
"""

from persona_dspy.cli.arguments import _server_options
from persona_dspy.cli.entry_point import main
from persona_dspy.cli.errors import CLIError
from persona_dspy.cli.parser import build_parser

__all__ = ["CLIError", "_server_options", "build_parser", "main"]
