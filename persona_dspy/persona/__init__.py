"""The persona as an instruction: the guard that keeps the template and bounds the user summary."""
