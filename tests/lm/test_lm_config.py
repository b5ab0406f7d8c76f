"""One LM configuration value: read from arguments and environment once, copied, pickled, fitted to its server."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from persona_dspy.lm import config as lm_module
from persona_dspy.lm import server_fit
from persona_dspy.lm.build import build_lm, build_optimizer_lm
from persona_dspy.lm.config import LMConfig, lm_config, optimizer_lm_config
from persona_dspy.lm.providers import OFFLINE_MODEL, LMConfigError
from persona_dspy.lm.report import describe_lm
from persona_dspy.lm.server_fit import ServerFit, fit_to_server


@pytest.fixture(autouse=True)
def no_lm_env(monkeypatch):
    for name in vars(lm_module):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(lm_module, name), raising=False)


def test_arguments_win_over_the_environment_which_wins_over_the_default(monkeypatch):
    assert lm_config().local and lm_config().model == "local"
    monkeypatch.setenv("PERSONA_DSPY_LM", "openai/from-env")
    monkeypatch.setenv("PERSONA_DSPY_API_BASE", "http://10.0.0.1:8000/v1/")
    monkeypatch.setenv("PERSONA_DSPY_API_KEY", "sk-env")
    monkeypatch.setenv("PERSONA_DSPY_ENGINE", "LiteLLM")
    config = lm_config(temperature=0.3)
    assert (config.model, config.api_base, config.api_key, config.engine) == (
        "openai/from-env", "http://10.0.0.1:8000/v1", "sk-env", "litellm")
    assert config.temperature == 0.3 and "sk-env" not in repr(config)
    mine = lm_config("qwen2.5", "http://127.0.0.1:9000/v1", api_key="sk-arg")
    assert (mine.model, mine.api_base, mine.api_key) == ("openai/qwen2.5", "http://127.0.0.1:9000/v1", "sk-arg")


def test_a_config_is_a_frozen_value_copied_per_temperature_and_checked_again():
    config = lm_config("openai/m", "http://127.0.0.1:8000/v1", max_tokens=64, server={"slots": 2})
    warmer = config.copy(temperature=0.7)
    assert warmer.temperature == 0.7 and config.temperature == 0.0
    assert warmer == dataclasses.replace(config, temperature=0.7) and warmer.server.slots == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(LMConfigError, match="max_tokens and timeout must be positive"):
        config.copy(max_tokens=0)
    with pytest.raises(LMConfigError, match="PERSONA_DSPY_ENGINE='fast'"):
        config.copy(engine="fast")
    with pytest.raises(TypeError, match="unknown LM setting"):
        lm_config("offline", temprature=0.5)


def test_a_config_travels_to_another_process_as_is_key_included():
    config = lm_config("openai/m", "http://a:8000/v1,http://b:8000/v1", api_key="sk-secret", timeout=5)
    again = pickle.loads(pickle.dumps(config))
    assert again == config and again.api_key == "sk-secret"
    assert again.pool and again.servers == ("http://a:8000/v1", "http://b:8000/v1") and again.api_base is None


def test_a_server_file_is_read_once_into_the_config(tmp_path):
    listing = tmp_path / "servers.txt"
    listing.write_text("# two servers\nhttp://a:8000/v1\nhttp://b:8000/v1  # the second\n")
    config = lm_config("openai/m", str(listing))
    listing.unlink()  # workers get the URLs, not the file
    assert config.pool and config.servers == ("http://a:8000/v1", "http://b:8000/v1")
    assert describe_lm(build_lm(config))["servers"] == ["http://a:8000/v1", "http://b:8000/v1"]


def test_build_lm_takes_a_config_or_the_same_settings_by_name():
    by_name = describe_lm(build_lm("openai/m", "http://127.0.0.1:8000/v1", temperature=0.5, num_retries=1))
    by_value = describe_lm(build_lm(lm_config("openai/m", "http://127.0.0.1:8000/v1", temperature=0.5,
                                              num_retries=1)))
    assert by_name == by_value and by_name["temperature"] == 0.5
    changed = build_lm(lm_config("offline"), max_tokens=32)
    assert changed.model == OFFLINE_MODEL and changed.kwargs["max_tokens"] == 32
    with pytest.raises(TypeError, match="config.copy"):
        build_lm(lm_config("offline"), "http://127.0.0.1:8000/v1")


def test_the_optimizer_config_takes_the_task_call_settings_never_its_server(monkeypatch):
    task = lm_config("openai/task", "http://127.0.0.1:8000/v1", max_tokens=99, timeout=7)
    assert optimizer_lm_config(like=task) is None  # none named: the task LM does it
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_LM", "openai/big")
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_API_BASE", "http://10.0.0.2:8000/v1")
    monkeypatch.setenv("PERSONA_DSPY_OPTIMIZER_API_KEY", "sk-opt")
    optimizer = optimizer_lm_config(like=task)
    assert (optimizer.model, optimizer.api_base, optimizer.api_key) == ("openai/big", "http://10.0.0.2:8000/v1",
                                                                        "sk-opt")
    assert (optimizer.max_tokens, optimizer.timeout) == (99, 7)
    monkeypatch.delenv("PERSONA_DSPY_OPTIMIZER_LM")
    with pytest.raises(LMConfigError, match="without an optimizer model"):
        optimizer_lm_config(like=task)
    monkeypatch.delenv("PERSONA_DSPY_OPTIMIZER_API_BASE")
    task_lm = build_lm(task)
    assert build_optimizer_lm(task_lm=task_lm) is task_lm


def test_fitting_to_a_server_on_this_machine_is_a_decision_not_a_patch(monkeypatch):
    monkeypatch.setattr(server_fit, "server_slots", lambda api_base: 2)
    local_server = lm_config("openai/m", "http://127.0.0.1:8000/v1")
    fit = fit_to_server(local_server, workers=8)
    assert fit.workers == 2 and "has 2 slot(s): running 2 worker(s) instead of 8" in fit.note
    assert local_server.read_timeout == 60  # a loopback server's timeout follows its latency (lm.attempts), from 60 s
    assert fit_to_server(local_server.copy(timeout=30), workers=2) == ServerFit()
    assert fit_to_server(lm_config("openai/m", "http://10.0.0.1:8000/v1"), workers=8) == ServerFit()
    assert fit_to_server(lm_config("local"), workers=8) == ServerFit(1)  # the embedded server: 1 slot by default
    assert fit_to_server(LMConfig("offline/stand-in"), workers=8) == ServerFit()


def test_the_declared_context_comes_with_every_lm_built_from_the_config():
    from persona_dspy.lm.budget import context_window

    config = lm_config("openai/m", "http://127.0.0.1:8123/v1", context_tokens=1234)
    assert context_window(build_lm(config)) == 1234  # declared, so the server is never asked
    assert context_window(build_lm(config.copy(temperature=0.9))) == 1234
