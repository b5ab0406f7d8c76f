"""How reports and the CLI say what the model's outputs were worth: counts in one line, a warning in words.

The counts are ``OutputStats.snapshot()`` dicts (``persona_dspy.outputs.validation``), per user or summed over users.
``--strict`` turns the warning into an error (exit 2, the CLI's rule for problems the user can fix): a run whose
outputs were mostly rejected produced scores that mean nothing, and a script should not take it for a result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from persona_dspy.outputs.validation import STEPS, mostly_invalid


def _by_step(counts: Mapping[str, int] | None) -> str:
    parts = [f"{step} {int(n)}" for step, n in (counts or {}).items() if n]
    return ", ".join(parts) if parts else "none"


def counts_line(totals: Mapping[str, Any]) -> str:
    """One line: LM calls and HTTP requests, invalid outputs by step (of those checked), retries, fallbacks,
    truncations."""
    checked = sum((totals.get("checked") or {}).values())
    invalid = sum((totals.get("invalid") or {}).values())
    return (f"outputs: {totals.get('lm_calls', 0)} LM calls, {requests_text(totals)}; {invalid} of {checked} "
            f"checked outputs invalid "
            f"({_by_step(totals.get('invalid'))}); retries: {_by_step(totals.get('retries'))}; "
            f"fallbacks (a reply read as raw text; a summary from the user's answers): "
            f"{_by_step(totals.get('fallbacks'))}; "
            f"truncated (finish_reason=length): {totals.get('truncations', 0)}")


def requests_text(totals: Mapping[str, Any]) -> str:
    """"890 HTTP requests (164 failed: http_error 150, timeout 14)": every request sent, retries and hedges included."""
    failed = sum((totals.get("failed_requests") or {}).values())
    text = f"{totals.get('requests', 0)} HTTP requests"
    return text + (f" ({failed} failed: {_by_step(totals.get('failed_requests'))})" if failed else " (none failed)")


def invalid_warning(totals: Mapping[str, Any]) -> str | None:
    """A sentence saying most outputs were invalid (and the first reasons), or None when they were not."""
    if not mostly_invalid(totals):
        return None
    checked = sum((totals.get("checked") or {}).values())
    invalid = sum((totals.get("invalid") or {}).values())
    worst = [step for step in STEPS if (totals.get("invalid") or {}).get(step)]
    reasons = "; ".join(totals.get("reasons") or [])
    return (f"most of the model's outputs were invalid ({invalid} of {checked}: {', '.join(worst)}), so these "
            f"results do not show what the method does with a working model"
            + (f"; first reasons: {reasons}" if reasons else "")
            + ". Check the model and the server (a larger or instruction-tuned model, the chat template).")


def strict_failure(totals: Mapping[str, Any], strict: bool) -> str | None:
    """Under ``--strict``, the error message for a run whose outputs were mostly invalid (None: nothing to fail)."""
    warning = invalid_warning(totals)
    return f"--strict: {warning}" if strict and warning else None
