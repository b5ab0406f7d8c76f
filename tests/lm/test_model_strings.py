"""Model strings as users paste them: a server's own model id with an api_base, provider prefixes, the README line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import dspy
import pytest
from loopback_server import loopback_fixture
from persona_dspy.signatures.task_signatures import task_signature

from persona_dspy.cli import main
from persona_dspy.lm import config as lm_module
from persona_dspy.lm.build import build_lm
from persona_dspy.lm.providers import LMConfigError
from persona_dspy.lm.report import describe_lm

REPO = Path(__file__).resolve().parents[2]
HF_ID = "Qwen/Qwen2.5-7B-Instruct"
LAMP3_USER = "A1L7M2JXN4EZCR"

server = loopback_fixture()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in vars(lm_module):
        if name.startswith("ENV_"):
            monkeypatch.delenv(getattr(lm_module, name), raising=False)
    monkeypatch.setenv("PERSONA_DSPY_HOME", str(tmp_path / "home"))


def ask(lm: dspy.LM) -> str:
    with dspy.context(lm=lm):
        return dspy.Predict(task_signature("LaMP_3"))(query="x", context="score: 2").answer


@pytest.mark.parametrize(("model", "litellm_model"), [
    (HF_ID, f"openai/{HF_ID}"),                              # vllm serve Qwen/Qwen2.5-7B-Instruct
    ("meta-llama/Llama-3.1-8B-Instruct", "openai/meta-llama/Llama-3.1-8B-Instruct"),
    ("qwen2.5-7b", "openai/qwen2.5-7b"),                      # llama.cpp / SGLang style bare id
    (f"openai/{HF_ID}", f"openai/{HF_ID}"),                  # already prefixed: unchanged
    (f"hosted_vllm/{HF_ID}", f"hosted_vllm/{HF_ID}"),
])
def test_a_pasted_model_id_with_an_api_base_means_an_openai_compatible_server(model, litellm_model):
    lm = build_lm(model, api_base="http://127.0.0.1:8000/v1")
    assert describe_lm(lm)["model"] == litellm_model  # as named; sent through the native openai-compatible route
    assert lm.model == f"openai-compatible/{litellm_model.partition('/')[2]}" and lm.engine == "lm15"


def test_without_an_api_base_an_unknown_provider_is_a_clear_error():
    with pytest.raises(LMConfigError, match="'Qwen' is not a LiteLLM provider.*api_base"):
        build_lm(HF_ID)


def test_a_local_model_that_is_neither_a_file_nor_a_known_name_is_a_clear_error():
    from persona_dspy.lm.models import ModelError

    with pytest.raises(ModelError, match="does not exist .*one of: smollm2"):
        build_lm("local/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("model", [HF_ID, f"openai/{HF_ID}", f"hosted_vllm/{HF_ID}"])
def test_the_server_receives_its_own_model_id(server, model):
    server.reset()
    assert ask(build_lm(model, api_base=server.api_base, num_retries=0)) == "2"
    [request] = server.stats()["requests"]
    assert request["model"] == HF_ID and request["path"] == "/v1/chat/completions"


def test_ollama_chat_reaches_ollamas_native_api_at_the_root(server):
    server.reset()
    lm = build_lm("ollama_chat/qwen2.5:7b", api_base=f"{server.url}/v1", num_retries=0)  # /v1 pasted by habit
    assert ask(lm) == "2"
    [request] = server.stats()["requests"]
    assert request["model"] == "qwen2.5:7b" and request["path"] == "/api/chat"


def readme_line(marker: str) -> list[str]:
    """The docs' command line (docs/local-model.md) that contains ``marker``, split as a shell would."""
    text = (REPO / "docs" / "local-model.md").read_text(encoding="utf-8")
    [line] = [line for line in text.splitlines() if line.startswith("persona-dspy ") and marker in line]
    return shlex.split(line)


def test_the_readme_vllm_line_works_as_written(server, tmp_path, capsys):
    argv = readme_line("8000")
    assert argv[:2] == ["persona-dspy", "compile"]
    api_base = argv[argv.index("--api-base") + 1]
    assert re.fullmatch(r"http://localhost:8000/v1", api_base)
    argv[argv.index("--api-base") + 1] = server.api_base  # the loopback stand-in for the vLLM server
    server.reset()
    out = tmp_path / "programs"
    code = main(argv[1:] + ["--memory", ":memory:", "--out", str(out), "--no-progress", "--users", LAMP3_USER,
                            "--iterations", "1", "--timeout", "20"])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((out / "compile_summary.json").read_text())
    assert summary["compiled"] == 1 and summary["lm"]["model"] == f"openai/{HF_ID}"
    assert {r["model"] for r in server.stats()["requests"]} == {HF_ID}
