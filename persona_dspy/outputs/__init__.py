"""What a model writes, checked before anything keeps it: validation, output budgets, raw-text fallbacks."""
