"""Episodic memory: each user's past interactions in Qdrant, the embeddings, and retrieval (a DSPy module and a tool).

May import ``data`` only.
"""

from persona_dspy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "EpisodicMemory": "episodic", "MemoryStoreError": "episodic", "Passage": "episodic", "SearchMode": "episodic",
    "default_memory_path": "episodic", "task_namespace": "episodic",
    "EmbeddingConfig": "embeddings", "EmbeddingModelError": "embeddings",
    "MemoryStore": "store", "open_store": "episodic",
    "MemoryRetrieval": "retrieval", "memory_search_tool": "retrieval",
})
