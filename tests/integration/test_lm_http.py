"""build_lm's settings, and the real HTTP path (LiteLLM -> a loopback OpenAI-compatible server) end to end.

Counts stay exact on a loaded machine: a test that asserts the server's counts sends without retries, and a test
that needs retries counts on the client what it sent and which answers (by id) it got.
"""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import LMServerError, LMTimeoutError
from loopback_server import loopback_fixture
from persona_dspy.signatures.labels import LAMP_3_LABELS
from persona_dspy.signatures.task_signatures import task_signature

from persona_dspy.lm import config as lm_module
from persona_dspy.lm.build import build_lm, build_optimizer_lm
from persona_dspy.lm.providers import OFFLINE_MODEL, LMConfigError, check_api_base
from persona_dspy.lm.report import describe_lm, is_offline
from persona_dspy.lm.usage import LMUsage
from persona_dspy.testing.offline_lm import OfflineEngine

ENV_NAMES = [name for name in vars(lm_module) if name.startswith("ENV_")]

server = loopback_fixture()
flaky_server = loopback_fixture(fail_first=1)  # started with --fail-first 1: its very first chat call gets a 500


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The runner's own PERSONA_DSPY_* settings must not leak into these tests."""
    for name in ENV_NAMES:
        monkeypatch.delenv(getattr(lm_module, name), raising=False)


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail if anything in this process connects anywhere but the loopback interface."""
    peers = []
    original = socket.socket.connect

    def connect(sock, address):
        peers.append(address)
        return original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield peers
    hosts = {p[0] for p in peers if isinstance(p, tuple)}
    assert hosts <= {"127.0.0.1", "::1", "localhost"}, f"non-loopback connections: {hosts}"


# --------------------------------------------------------------------------- settings


def test_offline_by_name_and_by_env(monkeypatch):
    lm = build_lm("offline")
    assert lm.model == OFFLINE_MODEL and isinstance(lm.engine, OfflineEngine)
    monkeypatch.setenv("PERSONA_DSPY_LM", "offline")
    monkeypatch.setenv("PERSONA_DSPY_API_BASE", "http://127.0.0.1:9/v1")  # ignored: the stand-in has no server
    assert describe_lm(build_lm())["engine"] == "offline"


def test_malformed_model_is_a_clear_error():  # no model at all means the embedded one (test_local_model)
    with pytest.raises(LMConfigError, match="provider prefix"):
        build_lm("qwen2.5-7b")
    with pytest.raises(LMConfigError, match="provider and a model"):
        build_lm("openai/ ", api_base="http://127.0.0.1:8000/v1")


@pytest.mark.parametrize("api_base", ["localhost:8000/v1", "http://", "ftp://127.0.0.1/v1", "http://host:99999/v1",
                                      "http://host:port/v1", "http://127.0.0.1:8000/v1?x=1"])
def test_malformed_api_base_is_a_clear_error(api_base):
    with pytest.raises(LMConfigError, match="malformed api_base"):
        build_lm("openai/m", api_base=api_base)


def test_local_server_settings():
    lm = build_lm("openai/qwen", api_base="http://127.0.0.1:8000/v1/", temperature=0.2, max_tokens=64, timeout=5,
                  num_retries=1)
    assert lm.model == "openai-compatible/qwen" and lm.engine == "lm15"  # dspy's native engine, max_tokens dialect
    assert lm.kwargs["api_base"] == "http://127.0.0.1:8000/v1" and lm.kwargs["api_key"] == "local"
    assert lm.kwargs["max_tokens"] == 64 and "max_completion_tokens" not in lm.kwargs
    info = describe_lm(lm)
    assert info == {"model": "openai/qwen", "engine": "lm15", "offline": False,
                    "api_base": "http://127.0.0.1:8000/v1", "temperature": 0.2, "max_tokens": 64, "timeout": 5,
                    "num_retries": 1, "cache": False}


def test_provider_variants():
    assert describe_lm(build_lm("qwen", api_base="http://127.0.0.1:8080/v1"))["model"] == "openai/qwen"  # llama.cpp
    vllm = build_lm("hosted_vllm/meta-llama/Llama-3.1-8B", api_base="http://127.0.0.1:8000/v1")
    assert describe_lm(vllm)["model"] == "hosted_vllm/meta-llama/Llama-3.1-8B"
    assert vllm.model == "openai-compatible/meta-llama/Llama-3.1-8B" and vllm.engine == "lm15"
    ollama = build_lm("ollama_chat/llama3.1", api_base="http://127.0.0.1:11434/v1")
    assert ollama.kwargs["api_base"] == "http://127.0.0.1:11434"  # Ollama's native API is at the root
    assert "api_base" not in build_lm("ollama_chat/llama3.1").kwargs


def test_env_settings_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("PERSONA_DSPY_LM", "openai/env-model")
    monkeypatch.setenv("PERSONA_DSPY_API_BASE", "http://127.0.0.1:8001/v1")
    monkeypatch.setenv("PERSONA_DSPY_API_KEY", "sk-env")
    lm = build_lm()
    assert (lm.served_as, lm.kwargs["api_base"], lm.kwargs["api_key"]) == ("openai/env-model", "http://127.0.0.1:8001/v1",
                                                                       "sk-env")
    lm = build_lm("openai/arg-model", "http://127.0.0.1:8002/v1", api_key="sk-arg")
    assert (lm.served_as, lm.kwargs["api_base"], lm.kwargs["api_key"]) == ("openai/arg-model", "http://127.0.0.1:8002/v1",
                                                                       "sk-arg")
    assert "api_key" not in describe_lm(lm) and "sk-arg" not in repr(describe_lm(lm))


def test_optimizer_lm_falls_back_to_the_task_lm(monkeypatch):
    task = build_lm("offline")
    assert build_optimizer_lm(task_lm=task) is task
    monkeypatch.setenv("PERSONA_DSPY_LM", "openai/task")
    monkeypatch.setenv("PERSONA_DSPY_API_BASE", "http://127.0.0.1:8001/v1")
    assert build_optimizer_lm().served_as == "openai/task"
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_LM", "openai/big")
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_API_BASE", "http://127.0.0.1:8003/v1")
    opt = build_optimizer_lm(task_lm=task, temperature=0.7)
    assert (opt.served_as, opt.kwargs["api_base"], opt.kwargs["temperature"]) == ("openai/big", "http://127.0.0.1:8003/v1",
                                                                              0.7)
    monkeypatch.delenv("PERSONA_DSPY_OPTIMIZER_API_BASE")
    assert "api_base" not in build_optimizer_lm().kwargs  # never silently sent to the task's server


def test_an_optimizer_api_base_without_an_optimizer_model_is_refused(monkeypatch):
    task = build_lm("offline")
    with pytest.raises(LMConfigError, match=r"api_base \(argument\) was given without an optimizer model"):
        build_optimizer_lm(None, "http://127.0.0.1:8003/v1", task_lm=task)
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_API_BASE", "http://127.0.0.1:8003/v1")
    with pytest.raises(LMConfigError, match="PERSONA_DSPY_OPTIMIZER_API_BASE"):
        build_optimizer_lm(task_lm=task)
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_LM", "openai/big")  # with a model it is that model's server
    assert build_optimizer_lm(task_lm=task).kwargs["api_base"] == "http://127.0.0.1:8003/v1"


def test_describe_lm_calls_offline_what_is_offline_calls_offline():
    class Named:  # a wrapper that keeps the stand-in's name but not its engine
        model, kwargs = OFFLINE_MODEL, {}

    for lm in (build_lm("offline"), Named(), build_lm("openai/m", "http://127.0.0.1:8000/v1")):
        assert describe_lm(lm)["offline"] is is_offline(lm)
    assert describe_lm(Named())["offline"] is True


def test_describe_lm_redacts_credentials_in_urls():
    lm = build_lm("openai/m", api_base="http://user:secret@127.0.0.1:8000/v1")
    assert describe_lm(lm)["api_base"] == "http://127.0.0.1:8000/v1"
    assert check_api_base(" https://example.org/v1/ ") == "https://example.org/v1"


# --------------------------------------------------------------------------- over HTTP


def test_predict_over_http_gets_a_valid_label(server, loopback_only):
    server.reset()
    lm = build_lm("openai/test-model", api_base=server.api_base, num_retries=0)  # exactly one request
    with dspy.context(lm=lm):
        pred = dspy.Predict(task_signature("LaMP_3"))(query="Works well.", context="score: 4\nscore: 4\nscore: 2")
    assert pred.answer in LAMP_3_LABELS and pred.answer == "4"
    stats = server.stats()
    assert stats["chat_requests"] == 1 and stats["answered"] == 1
    request = stats["requests"][0]
    assert request["model"] == "test-model" and request["max_tokens"] == 512 and request["temperature"] == 0.0
    assert "[[ ## answer ## ]]" in request["messages"][0]["content"]
    assert loopback_only, "the call went over a socket"


def test_json_adapter_over_http(server, loopback_only):
    server.reset()
    lm = build_lm("openai/test-model", api_base=server.api_base)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        pred = dspy.ChainOfThought(task_signature("LaMP_2N"))(query="x", context="category: sports, sports")
    assert pred.answer == "sports"
    assert server.stats()["requests"][0]["response_format"] is not None


@pytest.mark.parametrize("engine", ["native", "litellm"])
def test_the_fields_on_the_wire(server, loopback_only, monkeypatch, engine):
    """What llama.cpp needs on both engines: max_tokens (it ignores max_completion_tokens), the schema, the key."""
    monkeypatch.setenv(lm_module.ENV_ENGINE, engine)
    server.reset()
    lm = build_lm("openai/test-model", api_base=server.api_base, max_tokens=77, num_retries=0)
    assert lm.engine == ("lm15" if engine == "native" else "litellm")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 4").answer == "4"
    request = server.stats()["requests"][0]
    assert {"max_tokens", "messages", "model", "response_format", "temperature"} <= set(request["fields"])
    assert "max_completion_tokens" not in request["fields"] and request["max_tokens"] == 77
    schema = request["response_format"]["json_schema"]["schema"]
    assert request["response_format"]["type"] == "json_schema" and schema["properties"]["answer"]["enum"] == list(
        LAMP_3_LABELS)
    assert request["headers"]["authorization"] == "Bearer local" and request["model"] == "test-model"


def test_the_engine_switch_is_checked(monkeypatch):
    monkeypatch.setenv(lm_module.ENV_ENGINE, "fast")
    with pytest.raises(LMConfigError, match="PERSONA_DSPY_ENGINE"):
        build_lm("openai/m", api_base="http://127.0.0.1:8000/v1")
    monkeypatch.delenv(lm_module.ENV_ENGINE)
    assert build_lm("ollama_chat/llama3.1").engine == "litellm"  # Ollama stays on LiteLLM
    assert build_lm("openai/m", api_base="http://127.0.0.1:8000/v1", cache=True).engine == "litellm"


def test_server_errors_are_retried(flaky_server, loopback_only):
    lm = build_lm("openai/test-model", api_base=flaky_server.api_base, num_retries=2)
    with dspy.context(lm=lm):
        pred = dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 1")
    assert pred.answer == "1"
    stats = flaky_server.stats()
    assert (stats["chat_requests"], stats["failures"], stats["answered"]) == (2, 1, 1)


def test_without_retries_a_server_error_surfaces(server, loopback_only):
    server.reset(fail_next=1)
    lm = build_lm("openai/test-model", api_base=server.api_base, num_retries=0)
    with pytest.raises(LMServerError), dspy.context(lm=lm):
        dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 1")
    assert server.stats()["chat_requests"] == 1


def test_timeout_is_enforced(server, loopback_only):
    server.reset(latency=1.0)
    lm = build_lm("openai/test-model", api_base=server.api_base, timeout=0.3, num_retries=0)
    with pytest.raises(LMTimeoutError), dspy.context(lm=lm):
        dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 1")


def test_usage_over_http_and_threads(server, loopback_only):
    server.reset(latency=0.05)
    usage = LMUsage()
    lm = build_lm("openai/test-model", api_base=server.api_base, callbacks=[usage])
    contexts = ["score: 1", "score: 2", "score: 3", "score: 4", "score: 5", "score: 3"]

    def one(context):
        with dspy.context(lm=lm):
            return dspy.Predict(task_signature("LaMP_3"))(query="x", context=context).answer

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(one, contexts))
    assert answers == [c[-1] for c in contexts]
    snap = usage.snapshot()
    assert snap["calls"] == 6 and snap["errors"] == 0 and snap["unmetered_calls"] == 0
    assert snap["completion_tokens"] == 6 * 11 and snap["prompt_tokens"] > 0
    # What the client acknowledged: six distinct answers, each one the server gave. A retry on a loaded machine
    # may make the server answer more often than that, so its own count is only a lower bound.
    acknowledged = {entry["response"].id for entry in lm.history}
    stats = server.stats()
    assert len(lm.history) == 6 and len(acknowledged) == 6
    assert acknowledged <= {r["id"] for r in stats["requests"]} and stats["answered"] >= 6


def test_a_call_in_flight_at_a_reset_is_not_counted_after_it(server, loopback_only):
    """A timed-out call is still answered later: that must not land in the next test's counts (the CI flake)."""
    server.reset(latency=0.6)
    lm = build_lm("openai/test-model", api_base=server.api_base, timeout=0.2, num_retries=0)
    with pytest.raises(LMTimeoutError), dspy.context(lm=lm):
        dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 1")
    served = server.stats()["served"]
    server.reset()
    deadline = time.monotonic() + 30
    while server.stats()["served"] == served:  # wait until the server has answered the abandoned call
        assert time.monotonic() < deadline, "the abandoned call was never answered"
        time.sleep(0.05)
    stats = server.stats()
    assert (stats["chat_requests"], stats["answered"]) == (0, 0)


def test_a_separate_optimizer_lm_is_checked_like_the_task_lm():
    with pytest.raises(LMConfigError, match="must be positive"):
        build_optimizer_lm("openai/judge", "http://127.0.0.1:9/v1", max_tokens=0)
    with pytest.raises(LMConfigError, match="num_retries"):
        build_optimizer_lm("offline", num_retries=-1)
