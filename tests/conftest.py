"""Shared fixtures. Everything here runs offline: no model or data is downloaded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PERSONA_DSPY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Tests point PERSONA_DSPY_HOME into tmp folders; the cached real model stays where `models fetch` put it.
_HOME = Path(os.environ.get("PERSONA_DSPY_HOME") or Path.home() / ".persona_dspy").expanduser()
os.environ.setdefault("PERSONA_DSPY_MODELS", str(_HOME / "models"))

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
# Shared helpers (``loopback_server``) and the helpers some test modules share (``from test_cli import isolated``)
# import the same from every folder of tests/, whichever file runs first: test module names are unique.
for folder in [TESTS, *sorted(p for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__")]:
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", REPO_ROOT.parent / "shared"))
DENSE_MODEL_DIR = SHARED / "models" / "all-MiniLM-L6-v2-onnx"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """PERSONA_DSPY_TEST_SHUFFLE=<seed> runs the tests in a random order (no plugin needed): tests must not lean on
    each other's leftovers, e.g. a slow call from one test landing in the next test's server counts."""
    seed = os.environ.get("PERSONA_DSPY_TEST_SHUFFLE", "").strip()
    if seed:
        import random

        random.Random(int(seed)).shuffle(items)
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"shuffled {len(items)} tests with seed {seed}")


@pytest.fixture()
def no_lm_environment(monkeypatch, tmp_path):
    """No PERSONA_DSPY_* LM setting leaks in from the runner's environment; the home is a temporary folder."""
    from persona_dspy.lm import build

    for name in vars(build):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(build, name), raising=False)
    monkeypatch.setenv("PERSONA_DSPY_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def dense_model_dir() -> Path:
    if not (DENSE_MODEL_DIR / "model.onnx").is_file():
        pytest.skip(f"dense model folder absent ({DENSE_MODEL_DIR}); the BM25 path is tested without it")
    return DENSE_MODEL_DIR


@pytest.fixture(scope="session")
def bm25_embedder():
    from persona_dspy.memory.embeddings import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def hybrid_embedder(dense_model_dir):
    from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig

    return Embedder(EmbeddingConfig(sparse=True, dense=str(dense_model_dir)))


@pytest.fixture(scope="session")
def sample_memory(bm25_embedder):
    """Build (histories, in-memory store holding them) for a shipped sample; each call gets its own store."""
    from persona_dspy.data.lamp import dataset_dir, load_dataset
    from persona_dspy.memory.episodic import EpisodicMemory

    opened = []

    def build(task: str, n_users: int | None = None):
        histories = load_dataset(dataset_dir(task))[:n_users]
        memory = EpisodicMemory(":memory:", embedder=bm25_embedder)
        memory.add_histories(histories)
        opened.append(memory)
        return histories, memory

    yield build
    for memory in opened:
        memory.close()


@pytest.fixture()
def lm():
    """The offline stand-in LM, active for the test (a plumbing check, never a model)."""
    import dspy

    from persona_dspy.testing.offline_lm import offline_lm

    stand_in = offline_lm()
    with dspy.context(lm=stand_in):
        yield stand_in


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the whole session (its start costs seconds); skipped without Ray."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'persona-dspy[ray]', part of [dev])")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster: no token to set up
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
