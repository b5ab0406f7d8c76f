"""The ``persona-dspy`` command line: every command, one-line errors, exit codes (docs/cli.md).

Start-up stays fast: this package and everything a usage, data or task error needs import no dspy, litellm, qdrant,
fastembed or llama.cpp (a test checks it); each command imports what it uses, after the data has been read.
``entry_point`` holds ``main``; ``parser`` every command and flag; the ``*_commands`` modules run them.
Ctrl-C exits 130 and SIGTERM 143, after in-flight requests are cancelled (``lm.cancel``); a second signal exits at
once. Repeated warnings are counted, not repeated (``repeated_warnings``).
"""

from persona_dspy.cli.arguments import server_options
from persona_dspy.cli.entry_point import main
from persona_dspy.cli.errors import CLIError
from persona_dspy.cli.parser import build_parser

__all__ = ["CLIError", "build_parser", "main", "server_options"]
