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
from persona_dspy.lm.build import LMConfigError, resolve_lm_settings


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
        resolve_lm_settings("http://127.0.0.1:8000/v1")
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
