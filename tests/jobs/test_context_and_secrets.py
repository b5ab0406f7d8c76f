"""compile_users runs users in the caller's dspy.context; no credential reaches a file or a report."""

from __future__ import annotations

import json

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from persona_dspy.agent.persona_agent import PersonaAgent
from persona_dspy.evaluation.evaluate import evaluate
from persona_dspy.jobs.compile import SUMMARY_FILE, compile_users
from persona_dspy.lm.redact import REDACTED, redact_headers, redact_text, redact_url
from persona_dspy.lm.report import describe_lm
from persona_dspy.programs import load_program, program_state, save_program
from persona_dspy.testing.offline_lm import OfflineEngine, offline_lm

SECRET = "s3cr3t-Zq9"


@pytest.fixture(scope="module")
def lamp3(sample_memory):
    return sample_memory("LaMP_3", 3)


class Seen(BaseCallback):
    """A caller's callback: counts the LM calls it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def on_lm_start(self, call_id, instance, inputs) -> None:
        self.calls += 1


def test_compile_users_runs_in_the_callers_dspy_context(lamp3, tmp_path):
    histories, memory = lamp3
    seen = Seen()
    with dspy.context(callbacks=[seen]):
        summary = compile_users(histories, memory=memory, out_dir=tmp_path, lm=offline_lm(), workers=3,
                                progress=False)
    assert summary.count("compiled") == len(histories) and summary.lm_calls > 0
    assert seen.calls == summary.lm_calls  # every call, made on any worker thread


# --------------------------------------------------------------------------- credentials

URL_FORMS = {
    "user:pw@": f"http://alice:{SECRET}@127.0.0.1:8000/v1",
    "?key=": f"http://127.0.0.1:8000/v1?key={SECRET}",
    "?api_key= beside a setting": f"https://example.org/openai?api-version=2024-06-01&api_key={SECRET}",
    "?token= and user@": f"https://{SECRET}@example.org:8443/v1?access_token={SECRET}",
}
HEADER_FORMS = {
    "Authorization": {"Authorization": f"Bearer {SECRET}"},
    "X-Api-Key": {"X-Api-Key": SECRET},
    "api-key": {"api-key": SECRET, "X-Request-Source": "tests"},
    "cookie": {"Cookie": f"session={SECRET}"},
}


@pytest.mark.parametrize("url", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_urls_lose_their_credentials_and_keep_the_rest(url):
    clean = redact_url(url)
    assert SECRET not in clean
    assert clean.split("?")[0].endswith(("/v1", "/openai")) and ("127.0.0.1:8000" in clean or "example.org" in clean)
    if "api-version" in url:
        assert "api-version=2024-06-01" in clean and f"api_key={REDACTED}" in clean
    assert SECRET not in redact_text(f"POST {url} failed: Authorization: Bearer {SECRET}")


@pytest.mark.parametrize("headers", HEADER_FORMS.values(), ids=HEADER_FORMS.keys())
def test_headers_lose_their_credentials(headers):
    clean = redact_headers(headers)
    assert SECRET not in json.dumps(clean) and set(clean) == set(headers)
    assert clean.get("X-Request-Source", "tests") == "tests"


@pytest.mark.parametrize("setting", ["api_base", "base_url"])
@pytest.mark.parametrize("url", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_describe_lm_of_a_user_built_lm(url, setting):
    lm = dspy.LM("openai/m", engine="litellm", api_key=f"sk-{SECRET}", **{setting: url})
    info = describe_lm(lm)
    assert SECRET not in json.dumps(info) and info["api_base"] is not None


@pytest.mark.parametrize("headers", HEADER_FORMS.values(), ids=HEADER_FORMS.keys())
@pytest.mark.parametrize("url", URL_FORMS.values(), ids=URL_FORMS.keys())
def test_program_files_hold_no_credentials_of_predictor_level_lms(lamp3, tmp_path, url, headers):
    histories, memory = lamp3
    agent = PersonaAgent("LaMP_3", memory, "rag", user_id=histories[0].user_id)
    private = dspy.LM("openai/m", engine="litellm", api_base=url, api_key=f"sk-{SECRET}", extra_headers=headers,
                      extra_query={"key": SECRET})
    for predictor in agent.predictors():
        predictor.lm = private
    path = save_program(agent, tmp_path / "p.json", lm=private)
    text = path.read_text()
    assert SECRET not in text
    [state] = [entry["lm"] for entry in program_state(json.loads(text)).values() if entry.get("lm")]
    kept = {name: value for name, value in headers.items() if name == "X-Request-Source"}
    assert state["model"] == "openai/m" and state["extra_headers"] == kept
    assert state["extra_query"] == {}  # dropped, not replaced: dspy would send a placeholder on as a credential
    with dspy.context(lm=offline_lm()):
        load_program(path, memory)  # still a loadable program


class LeakyError(OfflineEngine):
    """A server error whose message quotes the request URL and headers, as some client libraries do."""

    def complete(self, request):
        raise RuntimeError(f"POST http://bob:{SECRET}@10.0.0.1/v1/chat?key={SECRET} -> 500; "
                           f"headers: Authorization: Bearer {SECRET}")


def test_error_messages_in_summaries_and_reports_are_redacted(lamp3, tmp_path):
    histories, memory = lamp3
    lm = dspy.LM("offline/leaky", engine=LeakyError(), cache=False, num_retries=0)
    summary = compile_users(histories[:1], memory=memory, out_dir=tmp_path, lm=lm, progress=False)
    assert summary.count("failed") == 1
    text = (tmp_path / SUMMARY_FILE).read_text()
    assert SECRET not in text and "10.0.0.1/v1/chat" in text
    report = evaluate(histories[:1], memory=memory, lm=lm, progress=False)
    assert report.failures and SECRET not in json.dumps(report.to_dict(), default=str)
