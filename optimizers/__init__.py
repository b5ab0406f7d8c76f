"""Teleprompters and their losses, on top of the core: PersonaAligner, the GEPA wiring, the Optuna study.

Installed as ``persona_dspy.optimizers`` (this folder is mapped there by ``pyproject.toml``).
"""
