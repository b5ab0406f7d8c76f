"""Test support shipped with the package: the offline stand-in LM, a deterministic test double (never a model).

Nothing on the product's path imports it; ``build_lm("offline")`` (``--lm offline``) loads it on demand.
"""
