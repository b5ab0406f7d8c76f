"""A pool of model servers: bounded calls in flight per server, a failing server taken out and its calls retried."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
from dspy.utils.exceptions import LMInvalidRequestError, LMServerError
from loopback_server import LoopbackServer

from persona_dspy.lm.build import build_lm
from persona_dspy.lm.pool import ServerPool, is_server_fault
from persona_dspy.lm.providers import LMConfigError, server_list
from persona_dspy.lm.report import describe_lm
from persona_dspy.lm.usage import LMUsage, counting
from persona_dspy.outputs.validation import OutputStats


class FakeServerLM:
    """Stands in for one server's dspy.LM: records concurrency, answers or fails as scripted."""

    def __init__(self, name: str, *, fail: BaseException | None = None, delay: float = 0.0) -> None:
        self.name, self.fail, self.delay = name, fail, delay
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, request):
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return f"{self.name}:{request}"
        finally:
            with self._lock:
                self.active -= 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_server_list_reads_commas_and_files(tmp_path):
    assert server_list(None) is None
    assert server_list("http://a:8000/v1/, http://b:8000/v1") == ["http://a:8000/v1", "http://b:8000/v1"]
    listing = tmp_path / "servers.txt"
    listing.write_text("# GPU boxes\nhttp://a:8000/v1\n\nhttp://b:8000/v1  # the second\n")
    assert server_list(str(listing)) == ["http://a:8000/v1", "http://b:8000/v1"]
    (tmp_path / "empty.txt").write_text("# none yet\n")
    with pytest.raises(LMConfigError, match="names no server"):
        server_list(str(tmp_path / "empty.txt"))
    with pytest.raises(LMConfigError, match="neither a URL nor a file"):
        server_list(str(tmp_path / "missing.txt"))
    with pytest.raises(LMConfigError, match="malformed api_base 'ftp://x'"):
        server_list("http://a:8000/v1,ftp://x")
    with pytest.raises(LMConfigError, match="named twice"):
        server_list("http://a:8000/v1,http://a:8000/v1/")


def test_faults_are_told_apart_by_dspy_error_class():
    assert is_server_fault(LMServerError("503")) and is_server_fault(ConnectionRefusedError())
    assert not is_server_fault(LMInvalidRequestError("context too long")) and not is_server_fault(ValueError())


def test_calls_in_flight_stay_within_the_bound_per_server():
    servers = [FakeServerLM("a", delay=0.02), FakeServerLM("b", delay=0.02)]
    pool = ServerPool([(s.name, s) for s in servers], max_in_flight=2)
    with ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(pool.complete, range(40)))
    assert sorted(int(answer.split(":")[1]) for answer in answers) == list(range(40))
    assert all(s.max_active <= 2 for s in servers), [s.max_active for s in servers]
    assert sum(s.calls for s in servers) == 40 and all(s.calls > 0 for s in servers)


def test_a_failing_server_is_taken_out_and_its_calls_answered_elsewhere():
    clock = Clock()
    down, up = FakeServerLM("down", fail=LMServerError("connection refused")), FakeServerLM("up")
    pool = ServerPool([("down", down), ("up", up)], cooldown=10.0, clock=clock)
    assert [pool.complete(i) for i in range(6)] == [f"up:{i}" for i in range(6)]
    assert down.calls == 1  # tried once, then out: every later call went straight to the healthy server
    assert [row["out"] for row in pool.describe()] == [True, False]
    clock.now += 10.5  # the cooldown has passed: the server is tried again, fails, and stays out twice as long
    pool.complete("again")
    assert down.calls == 2
    clock.now += 15.0
    pool.complete("still out")
    assert down.calls == 2
    down.fail = None  # it recovers: once its (doubled) cooldown has passed it answers again
    clock.now += 10.0
    answers = {pool.complete(i) for i in range(4)}
    assert down.calls > 2 and any(a.startswith("down:") for a in answers)


def test_a_bad_request_is_raised_at_once_without_blaming_the_server():
    servers = [FakeServerLM(n, fail=LMInvalidRequestError("prompt too long")) for n in ("a", "b")]
    pool = ServerPool([(s.name, s) for s in servers])
    with pytest.raises(LMInvalidRequestError):
        pool.complete("x")
    assert sum(s.calls for s in servers) == 1  # not retried: another server would reject it too
    assert not any(row["out"] for row in pool.describe())


def test_every_server_failing_fails_the_call_after_its_attempts():
    servers = [FakeServerLM(n, fail=LMServerError("down")) for n in ("a", "b")]
    pool = ServerPool([(s.name, s) for s in servers], cooldown=0.0, retries=1)
    with pytest.raises(LMServerError):
        pool.complete("x")
    assert sum(s.calls for s in servers) == 3  # one attempt per server, plus one retry


def test_an_api_base_naming_two_servers_builds_a_pool_that_survives_a_dead_one():
    with LoopbackServer() as server:
        lm = build_lm("openai/test-model", f"{server.api_base},http://127.0.0.1:9/v1", timeout=5)
        described = describe_lm(lm)
        assert described["engine"] == "ServerPool"
        assert described["servers"] == [server.api_base, "http://127.0.0.1:9/v1"]
        usage, outputs = LMUsage(), OutputStats()
        with dspy.context(lm=lm), counting(usage, outputs):  # as the jobs count (the server LMs are metered too)
            answers = [dspy.Predict("question -> answer")(question=f"q{i}").answer for i in range(4)]
        # each call counted once by every counter, whichever server answered it
        assert len(answers) == 4 and usage.calls == outputs.snapshot()["lm_calls"] == 4
        assert server.stats()["answered"] == 4
        rows = lm.engine.describe()
        assert rows[1]["errors"] >= 1 and rows[1]["out"]
