"""The agent: PersonaAgent (retrieve, reason, answer under the persona), semantic memory, and answer mapping.

May import ``data``, ``memory``, ``lm``, ``signatures`` and ``optimizers``.
"""

from persona_dspy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "AgentMode": "persona_agent", "PersonaAgent": "persona_agent",
    "initial_agent": "semantic_memory", "initial_persona": "semantic_memory",
})
