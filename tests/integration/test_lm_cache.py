"""With cache=True, one server's cached answer is never returned for another server's request."""

from __future__ import annotations

import dspy
import pytest
from dspy.clients.cache import Cache
from loopback_server import loopback_fixture
from persona_dspy.signatures.task_signatures import task_signature

from persona_dspy.lm.build import build_lm
from persona_dspy.lm.engine import CACHE_SCOPE_HEADER
from persona_dspy.lm.report import describe_lm

server_a = loopback_fixture()
server_b = loopback_fixture()


@pytest.fixture(autouse=True)
def private_cache(monkeypatch):
    """A fresh in-memory dspy cache: nothing from other tests or runs, nothing written to ~/.dspy_cache."""
    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None))


def ask(lm: dspy.LM, context: str = "score: 3") -> str:
    with dspy.context(lm=lm):
        return dspy.Predict(task_signature("LaMP_3"))(query="same question", context=context).answer


def test_the_cache_is_keyed_by_server(server_a, server_b):
    server_a.reset()
    server_b.reset()
    on_a = build_lm("openai/test-model", api_base=server_a.api_base, cache=True, num_retries=0)
    on_b = build_lm("openai/test-model", api_base=server_b.api_base, cache=True, num_retries=0)
    assert ask(on_a) == ask(on_b) == "3"
    assert server_a.stats()["answered"] == 1
    assert server_b.stats()["answered"] == 1, "server B's request was answered from server A's cache entry"
    assert ask(on_a) == "3" and ask(on_a.copy(max_tokens=512)) == "3"  # the cache still works per server
    assert server_a.stats()["answered"] == 1
    assert describe_lm(on_a)["cache"] is True and CACHE_SCOPE_HEADER not in str(describe_lm(on_a))


def test_without_the_cache_nothing_is_added_to_requests():
    lm = build_lm("openai/test-model", api_base="http://127.0.0.1:8000/v1")
    assert "extra_headers" not in lm.kwargs
