"""persona-dspy: PersonaAgent (arXiv 2506.06254) as DSPy programs.

Per-user episodic memory in Qdrant, a persona (semantic memory) that conditions the agent's
answers, and test-time alignment of that persona as an optimizable instruction.
"""

__version__ = "0.1.0"
