"""``python -m persona_dspy.cli``: the same as the ``persona-dspy`` command."""

import sys

from persona_dspy.cli.entry_point import main

sys.exit(main())
