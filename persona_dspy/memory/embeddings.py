"""Text embeddings for episodic memory, offline-first.

BM25 sparse vectors are the default: Qdrant Edge's built-in ``Bm25`` (English stopwords and Snowball stemmer,
k=1.2, b=0.75, avg_len=256), which needs no model weights and is fastembed's ``Qdrant/bm25`` token for token except
that it splits words at underscores (``sr_1_1`` in a URL), and faster. A dense model is optional, through fastembed:
a model name (downloaded when online) or a local ONNX folder such as ``../shared/models/all-MiniLM-L6-v2-onnx``.
With both, memory searches both and fuses the ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BM25_LANGUAGE = "english"
DEFAULT_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SPARSE_VECTOR = "bm25"
DENSE_VECTOR = "dense"


class EmbeddingModelError(RuntimeError):
    """A configured embedding model cannot be loaded (absent offline, wrong folder, ...)."""


def offline_mode() -> bool:
    """True when nothing may be downloaded (tests, CI, air-gapped machines)."""
    return any(os.environ.get(var, "").lower() in {"1", "true", "yes"}
               for var in ("PERSONA_DSPY_OFFLINE", "HF_HUB_OFFLINE"))


@dataclass(frozen=True)
class SparseVectorData:
    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class EmbeddingConfig:
    """Which vectors memory keeps. ``dense`` is a fastembed model name or a local model folder."""

    sparse: bool = True
    dense: str | None = None
    dense_model_name: str = DEFAULT_DENSE_MODEL

    def __post_init__(self) -> None:
        if not self.sparse and not self.dense:
            raise ValueError("EmbeddingConfig needs sparse (BM25), a dense model, or both")

    @classmethod
    def from_env(cls) -> EmbeddingConfig:
        """PERSONA_DSPY_DENSE_MODEL (name or folder) turns hybrid retrieval on."""
        dense = os.environ.get("PERSONA_DSPY_DENSE_MODEL") or None
        return cls(sparse=True, dense=dense)

    @property
    def label(self) -> str:
        parts = (["bm25"] if self.sparse else []) + ([f"dense:{Path(self.dense).name}"] if self.dense else [])
        return "+".join(parts)


class Embedder:
    """Embeds documents and queries into the vectors an ``EmbeddingConfig`` names."""

    def __init__(self, config: EmbeddingConfig | None = None, *, threads: int | None = None) -> None:
        self.config = config or EmbeddingConfig()
        self._sparse = _load_bm25() if self.config.sparse else None
        self._dense = _load_dense(self.config, threads) if self.config.dense else None
        self.dense_size: int | None = None
        if self._dense is not None:
            self.dense_size = len(next(iter(self._dense.query_embed("probe"))))

    def __deepcopy__(self, memo: dict) -> Embedder:
        return self  # loaded models are read-only and large: share them

    @property
    def has_sparse(self) -> bool:
        return self._sparse is not None

    @property
    def has_dense(self) -> bool:
        return self._dense is not None

    def embed_documents(self, texts: list[str], batch_size: int = 256) -> list[dict[str, object]]:
        """One dict per text mapping vector name -> vector (dense: list[float]; sparse: SparseVectorData)."""
        out: list[dict[str, object]] = [{} for _ in texts]
        if not texts:
            return out
        if self._sparse is not None:
            for row, text in zip(out, texts, strict=True):
                emb = self._sparse.embed_document(text)
                row[SPARSE_VECTOR] = SparseVectorData(emb.indices, emb.values)
        if self._dense is not None:
            # Batches pad to their longest text: embedding in length order wastes far less compute.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors = self._dense.embed([texts[i] for i in order], batch_size=min(batch_size, 32))
            for i, vec in zip(order, vectors, strict=True):
                out[i][DENSE_VECTOR] = np.asarray(vec, dtype=np.float32).tolist()
        return out

    @property
    def vector_names(self) -> list[str]:
        """The vectors this embedder produces, in the order searches fuse them."""
        models = ((SPARSE_VECTOR, self._sparse), (DENSE_VECTOR, self._dense))
        return [name for name, model in models if model is not None]

    def embed_query(self, text: str, names: list[str] | None = None) -> dict[str, object]:
        """The query's vectors: only ``names`` (default all), so a BM25 search never runs the dense model."""
        wanted = self.vector_names if names is None else names
        vectors: dict[str, object] = {}
        if SPARSE_VECTOR in wanted and self._sparse is not None:
            emb = self._sparse.embed_query(text)
            vectors[SPARSE_VECTOR] = SparseVectorData(emb.indices, emb.values)
        if DENSE_VECTOR in wanted and self._dense is not None:
            vectors[DENSE_VECTOR] = np.asarray(next(iter(self._dense.query_embed(text))), dtype=np.float32).tolist()
        return vectors


def _load_bm25():
    from qdrant_edge import Bm25, Bm25Config

    return Bm25(Bm25Config(language=BM25_LANGUAGE))


def _load_dense(config: EmbeddingConfig, threads: int | None):
    from fastembed import TextEmbedding

    assert config.dense is not None
    candidate = Path(config.dense).expanduser()
    if candidate.is_dir():
        if not (candidate / "model.onnx").is_file():
            raise EmbeddingModelError(
                f"dense model folder {candidate} has no model.onnx; point at a folder with an ONNX export "
                f"(model.onnx, tokenizer.json, config.json), e.g. ../shared/models/all-MiniLM-L6-v2-onnx"
            )
        try:
            return TextEmbedding(config.dense_model_name, specific_model_path=str(candidate), threads=threads)
        except Exception as exc:  # fastembed raises plain exceptions for broken folders
            raise EmbeddingModelError(f"cannot load dense model from {candidate}: {exc}") from exc
    if any(sep in config.dense for sep in ("/", os.sep)) and config.dense.startswith((".", "/", "~")):
        raise EmbeddingModelError(f"dense model folder {config.dense} does not exist")
    offline = offline_mode()
    try:
        return TextEmbedding(config.dense, threads=threads, local_files_only=offline)
    except Exception as exc:
        how = ("downloads are disabled (PERSONA_DSPY_OFFLINE/HF_HUB_OFFLINE) and it is not in fastembed's cache"
               if offline else "fastembed could not download or find it")
        raise EmbeddingModelError(
            f"dense model {config.dense!r} is not available: {how}. Point --dense at a local ONNX folder "
            f"(e.g. ../shared/models/all-MiniLM-L6-v2-onnx) or run once with internet access so fastembed "
            f"caches it (FASTEMBED_CACHE_PATH). Cause: {exc}"
        ) from exc
