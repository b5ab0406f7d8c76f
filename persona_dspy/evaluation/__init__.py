"""Evaluation: LaMP's metrics, evaluating agents over users, retrieval quality, and the report tables.

May import everything below it: ``data``, ``memory``, ``lm``, ``agent``, ``programs``.
"""
