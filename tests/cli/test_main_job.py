"""The main job as a user lives it, without a model: cancelling requests, the embedded server's sizing, and messages.

The same against the real embedded model (signals to compile, predict and eval) is in
``test_interrupt_local_model.py`` (slow).
"""

from __future__ import annotations

import socket
import threading

import pytest

from persona_dspy.cli import build_parser, main
from persona_dspy.lm import cancel
from persona_dspy.lm.config import lm_config
from persona_dspy.lm.providers import LMConfigError, litellm_model


@pytest.fixture(autouse=True)
def isolated(no_lm_environment):
    """No LM settings from the environment; the home is a temporary folder."""


# --------------------------------------------------------------------------- cancelling requests


@pytest.fixture()
def silent_server():
    """A TCP server that accepts and never answers: a client's read blocks until its socket is shut down."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.extend([listener.accept()[0], listener.accept()[0]]),
                              daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    for conn in accepted:
        conn.close()
    listener.close()


def test_cancel_wakes_a_thread_blocked_on_a_reply_and_refuses_new_requests(silent_server):
    api_base = f"http://127.0.0.1:{silent_server}/v1"
    outcome: list[object] = []
    sent = threading.Event()

    def wait_for_reply() -> None:
        with socket.create_connection(("127.0.0.1", silent_server)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n")
            sent.set()
            outcome.append(client.recv(1024))  # b"" once the socket is shut down

    reader = threading.Thread(target=wait_for_reply, daemon=True)
    reader.start()
    with socket.create_connection(("127.0.0.1", silent_server)) as other_server_socket:
        assert sent.wait(10)
        try:
            assert cancel.cancel(api_base) == 2  # the reader's and this one: whoever opened them
            reader.join(10)
            assert not reader.is_alive() and outcome == [b""]
            with pytest.raises(cancel.RequestsCancelled, match="cancelled: the command is stopping"):
                cancel.check_allowed(f"http://127.0.0.1:{silent_server}/v1/chat/completions")
            cancel.check_allowed(f"http://127.0.0.1:{silent_server + 1}/v1")  # another server is not affected
        finally:
            cancel.allow(api_base)
        cancel.check_allowed(api_base)
        assert other_server_socket.fileno() >= 0  # shut down, never closed: the descriptor stays its owner's


# --------------------------------------------------------------------------- messages


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_url_given_as_the_model_says_to_use_the_api_base(capsys):
    with pytest.raises(LMConfigError, match=r"the model 'http://127.0.0.1:8000/v1' is a URL: pass the server's URL as "
                                            r"the api_base \(--api-base\)"):
        litellm_model("http://127.0.0.1:8000/v1", None)
    code, _, err = cli(capsys, "predict", "--task", "LaMP_3", "--user", "A1L7M2JXN4EZCR", "--text", "hi",
                       "--memory", ":memory:", "--lm", "http://user:secret@127.0.0.1:8000/v1")
    assert code == 2 and "is a URL" in err and "--api-base" in err and "not a LiteLLM provider" not in err
    assert "secret" not in err


@pytest.mark.parametrize("command", ["predict", "eval", "compile", "serve"])
def test_server_slots_help_names_no_flag_the_command_lacks(capsys, command):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--server-slots" in text and "default: --workers" not in text and "default 1" in text


@pytest.mark.parametrize("spelling", ["LaMP3", "lamp_3"])
def test_a_task_spelling_is_read_as_the_task_and_said_once(capsys, spelling):
    code, _, err = cli(capsys, "users", "--task", spelling, "--memory", ":memory:", "--max-users", "1")
    assert code == 0 and err.count(f"--task {spelling!r} read as LaMP_3") == 1
    code, _, err = cli(capsys, "users", "--task", "LaMP_3", "--memory", ":memory:", "--max-users", "1")
    assert code == 0 and "read as" not in err


# --------------------------------------------------------------------------- progress that moves


class RecordingBar:
    """A tqdm stand-in: records each status line the run shows."""

    disable = False

    def __init__(self, *args, **kwargs) -> None:
        self.n, self.lines = 0, []

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.lines.append(text)


def test_a_signature_names_its_step_whatever_its_instructions():
    from persona_dspy.signatures.persona import PersonaSummary, PersonaUpdate, TextualLoss
    from persona_dspy.signatures.task_signatures import ProductRating

    from persona_dspy.evaluation.progress import step_of

    assert [step_of(s.with_instructions("rewritten")) for s in (PersonaSummary, TextualLoss, PersonaUpdate)] == [
        "summary", "loss", "update"]
    assert step_of(ProductRating) == "answer"


def test_compile_shows_each_users_step_tokens_and_an_eta(sample_memory, tmp_path, monkeypatch):
    from persona_dspy.jobs import compile as compile_module
    from persona_dspy.testing.offline_lm import offline_lm

    bars: list[RecordingBar] = []
    monkeypatch.setattr(compile_module, "progress_bar", lambda *a, **k: bars.append(RecordingBar()) or bars[-1])
    histories, memory = sample_memory("LaMP_3", 2)
    summary = compile_module.compile_users(histories, memory=memory, out_dir=tmp_path, lm=offline_lm(), workers=1,
                                           n_recent=3, iterations=1, stop_when_perfect=False)
    lines = bars[0].lines
    assert summary.count("compiled") == 2 and summary.lm_calls > 0
    for user in (h.user_id[:10] for h in histories):
        assert any(f"{user}: answer 1/2" in line for line in lines), lines[:5]  # the 2 held back of 3
        assert any(f"{user}: loss 1/1" in line for line in lines) and any(f"{user}: update" in line for line in lines)
    assert all("tok/s" in line for line in lines if "answer" in line)
    assert any("ETA ~" in line for line in lines)


def test_eval_shows_each_users_answers_out_of_their_queries(sample_memory, monkeypatch):
    from persona_dspy.evaluation import evaluate as evaluate_module
    from persona_dspy.testing.offline_lm import offline_lm

    bars: list[RecordingBar] = []
    monkeypatch.setattr(evaluate_module, "progress_bar", lambda *a, **k: bars.append(RecordingBar()) or bars[-1])
    histories, memory = sample_memory("LaMP_3", 2)
    report = evaluate_module.evaluate(histories, memory=memory, lm=offline_lm(), workers=1)
    assert report.n_scored > 0
    for history in histories:
        n = len(history.queries)
        assert any(f"{history.user_id[:10]}: answer {n}/{n}" in line for line in bars[0].lines), bars[0].lines[:5]


def test_repeated_warnings_are_shown_once_and_counted(capsys):
    import logging

    from persona_dspy.cli.repeated_warnings import install

    assert install(verbose=1, quiet=False) is None and install(verbose=0, quiet=True) is None  # -v shows each
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    counter = install(verbose=0, quiet=False)
    try:
        log = logging.getLogger("dspy.clients.lm")
        for _ in range(5):
            log.warning("LM response was truncated; increase max_tokens or inspect history.")
        for attempt in (1, 2, 1):
            logging.getLogger("persona_dspy.outputs.text").warning("%s output rejected (attempt %d of 2): %s",
                                                                   "update", attempt, "a template placeholder")
        log.error("errors are never counted away")
        log.error("errors are never counted away")
        err = capsys.readouterr().err
        assert err.count("LM response was truncated") == 1 and err.count("output rejected") == 1
        assert err.count("errors are never counted away") == 2 and "-v shows each" in err
        assert counter.summary() == ("persona-dspy: repeated warnings not shown (-v shows each): 'LM response was "
                                     "truncated; increase max_tokens or inspect history.' 4 more times; "
                                     "'update output rejected (attempt 1 of 2): a template placeholder' 2 more times")
    finally:
        counter.remove()
        logging.basicConfig(level=logging.WARNING, force=True)


# --------------------------------------------------------------------------- the embedded server's sizing


def test_users_run_at_most_as_many_at_a_time_as_the_embedded_server_has_slots():
    from persona_dspy.lm import local_server, server_fit

    fit = server_fit.fit_to_server(lm_config("local"), workers=4)
    assert fit.workers == 1 and fit.note is None  # sized on purpose: said at -v only, not on every run
    assert server_fit.fit_to_server(lm_config("local", server={"slots": 2}), workers=4).workers == 2
    defaults = local_server.ServerSettings(local_server.Path("m.gguf"))
    assert (defaults.slots, defaults.context_per_slot, defaults.cache_ram_mib) == (1, 4096, 256)


def test_dspy_warnings_are_counted_though_dspy_sets_up_its_logging_later():
    import io
    import logging

    from persona_dspy.cli.repeated_warnings import cover_dspy, install

    dspy_logger = logging.getLogger("dspy")
    saved = dspy_logger.handlers[:]
    dspy_logger.handlers = []  # as in the CLI: dspy is not imported yet when the command starts
    counter = install(verbose=0, quiet=False)
    stream = io.StringIO()
    try:
        dspy_logger.addHandler(logging.StreamHandler(stream))  # dspy's import adds its handler
        cover_dspy()  # the CLI calls it once the LM is built
        for _ in range(3):
            logging.getLogger("dspy.clients.lm").warning("LM response was truncated")
        assert stream.getvalue().count("LM response was truncated") == 1
        assert "2 more times" in counter.summary()
    finally:
        counter.remove()
        dspy_logger.handlers = saved
