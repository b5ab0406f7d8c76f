"""LMs: building every LM the package uses (task and optimizer), describing them for reports, counting their calls.

May import ``data`` and ``optimizers``. The offline stand-in lives in ``persona_dspy.testing`` and is loaded here
only when asked for by name (``--lm offline``).
"""

from persona_dspy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "LMConfig": "config", "LMConfigError": "providers", "lm_config": "config", "optimizer_lm_config": "config",
    "LMUsage": "usage", "build_lm": "build", "build_optimizer_lm": "build", "describe_lm": "report",
    "is_offline": "report",
})
