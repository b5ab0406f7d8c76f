"""Every HTTP request the native engine sends: counted, timed, and sent again when a server sits on it.

An LM call is one call to dspy whatever it took; the server sees every request: dspy's retries, a pool's other
servers, hedges. ``lm.native``'s adapter sends each request through ``send``, which

* counts it on the counters active in the caller's context (``LMUsage.requests``), and each request that brought
  no answer (``LMUsage.errors``, by kind: ``http_error``, ``timeout``, ``connection``, ``abandoned``);
* times every answered request per server (``ServerState``): once a server has answered ``MIN_SAMPLES``, its p95
  latency is known;
* for a server the run ``watch``-es (the CLI watches every server it talks to except the embedded CPU server, see
  ``lm.server_fit``): a request still unanswered after ``hedge_delay`` (``HEDGE_FACTOR`` x p95, at least
  ``HEDGE_FLOOR`` s) is sent again, up to ``MAX_HEDGES`` times at doubling intervals, and the first answer is
  taken; the others are abandoned and their connections closed, which cancels them on a server that stops work for
  a client that left (llama.cpp does: ``docs/faults.md``). With ``adapt_timeout`` the read timeout of each request
  also follows the server: ``TIMEOUT_FACTOR`` x p95 x (requests in flight / the slots it reports), between
  ``TIMEOUT_FLOOR`` and the LM's own timeout.

The first request runs on the caller's thread (no hand-off: the common case costs a timestamp); a hedge runs on a
daemon thread of its own, started by one watchdog thread that holds the deadlines. A request that times out is
closed by the transport, which cancels it on such a server too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from dspy._vendor.lm15.transports import StdlibTransport  # the transport dspy's native engine uses

from persona_dspy.lm.usage import active_request_counters, count_request, mark_counted

logger = logging.getLogger(__name__)

MIN_SAMPLES = 20
"""Answered requests before a server's latency counts as known."""
HEDGE_FACTOR = 2.0
HEDGE_FLOOR = 0.25
MAX_HEDGES = 4
"""Copies sent after the first at most; each waits twice as long as the one before (``hedge_delay`` x 1, 2, 4, 8)."""
TIMEOUT_FACTOR = 20.0
TIMEOUT_FLOOR = 10.0
_WINDOW = 256


class ServerState:
    """One server's answered-request latencies (the last ``_WINDOW``), requests in flight, and what the run allows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: deque[float] = deque(maxlen=_WINDOW)
        self.in_flight = 0
        self.hedge = False
        self.adapt_timeout = False
        self.slots: int | None = None
        self.ceiling: float | None = None
        self._p95: float | None = None
        self._stale = 0

    def record(self, seconds: float) -> None:
        with self.lock:
            self.samples.append(seconds)
            self._stale += 1

    def p95(self) -> float | None:
        """The 95th percentile of answered latencies, or None before ``MIN_SAMPLES`` answers."""
        with self.lock:
            if len(self.samples) < MIN_SAMPLES:
                return None
            if self._p95 is None or self._stale >= 16:  # re-sorted every 16 answers, not every request
                ordered = sorted(self.samples)
                self._p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
                self._stale = 0
                logger.debug("p95 latency %.3f s over the last %d answers", self._p95, len(ordered))
            return self._p95

    def hedge_delay(self) -> float | None:
        """Seconds after which an unanswered request is sent again; None when this server is not hedged."""
        p95 = self.p95() if self.hedge else None
        return None if p95 is None else max(HEDGE_FLOOR, HEDGE_FACTOR * p95)

    def read_timeout(self) -> float | None:
        """This request's read timeout when the server's is adapted (module docstring), else None (the LM's)."""
        p95 = self.p95() if self.adapt_timeout else None
        if p95 is None:
            return None
        queue = max(1, math.ceil(self.in_flight / self.slots)) if self.slots else 1
        timeout = max(TIMEOUT_FLOOR, TIMEOUT_FACTOR * p95 * queue)
        return min(timeout, self.ceiling) if self.ceiling else timeout

    def describe(self) -> dict[str, Any]:
        p95 = self.p95()
        return {"answered": len(self.samples), "p95_seconds": None if p95 is None else round(p95, 4),
                "hedge": self.hedge, "hedge_delay": self.hedge_delay(), "adapt_timeout": self.adapt_timeout,
                "slots": self.slots, "timeout_ceiling": self.ceiling}


_SERVERS: dict[str, ServerState] = {}
_SERVERS_LOCK = threading.Lock()


def _key(base_url: str) -> str:
    return base_url.rstrip("/")


def server_state(base_url: str) -> ServerState:
    """The state of the server at ``base_url`` (created on first use)."""
    key = _key(base_url)
    state = _SERVERS.get(key)
    if state is None:
        with _SERVERS_LOCK:
            state = _SERVERS.setdefault(key, ServerState())
    return state


def watch(base_url: str, *, hedge: bool = True, adapt_timeout: bool = False, slots: int | None = None,
          ceiling: float | None = None) -> ServerState:
    """Let requests to this server be hedged once its latency is known, and (``adapt_timeout``) their read timeout
    follow it, at most ``ceiling`` s. Never for the embedded server (its CPU runs one request per slot: a second
    copy only slows the first), which is refused."""
    import sys

    local = sys.modules.get("persona_dspy.lm.local_server")
    if local is not None and local.served_by(base_url):
        raise ValueError(f"{base_url} is the embedded CPU server: its requests are never hedged")
    state = server_state(base_url)
    with state.lock:
        state.hedge, state.adapt_timeout = hedge, adapt_timeout
        state.slots, state.ceiling = slots, ceiling
    return state


def unwatch_all() -> None:
    """Forget every server's latencies and settings (tests; a process that switches servers)."""
    with _SERVERS_LOCK:
        _SERVERS.clear()


# --------------------------------------------------------------------------- cancelling a request in flight

_CURRENT = threading.local()


class _Token:
    """One HTTP request of a group: its socket while in flight, so another thread can close it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.cancelled = False
        self.sent = False  # the whole request was written: the server has it (and counts it)
        self.index = 0  # 0: the first copy; 1...: hedges
        self.started = time.perf_counter()

    def attach(self, sock: socket.socket) -> None:
        with self.lock:
            if self.cancelled:
                raise ConnectionAbortedError("abandoned before it was sent")
            self.sock = sock

    def detach(self) -> None:
        with self.lock:
            self.sock = None

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.sock is not None:
                _shut(self.sock)


def _shut(sock: socket.socket) -> None:
    """Wake the thread reading ``sock`` and tell the server the client left (close alone does neither)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class CancellableTransport(StdlibTransport):
    """lm15's stdlib transport, telling the request's token which socket it uses (so a hedge can close it).

    The token lets go of the socket before the connection goes back to the pool, so a late cancel never reaches a
    connection another request took. It overrides two of lm15's internal methods (``_send_request``,
    ``_make_release``, dspy 3.4's vendored lm15): ``tests/test_faults.py`` fails if they change.
    """

    def _send_request(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        token = getattr(_CURRENT, "token", None)
        if token is not None:
            token.attach(conn.sock)
        super()._send_request(conn, *args, **kwargs)
        if token is not None:
            token.sent = True

    def _make_release(self, conn: Any, keep_alive: bool) -> Callable[[bool], None]:
        release = super()._make_release(conn, keep_alive)
        token = getattr(_CURRENT, "token", None)

        def detach_then_release(body_consumed: bool) -> None:
            if token is not None:
                token.detach()
            release(body_consumed)

        return detach_then_release


def cancellable(transport: Any) -> Any:
    """``transport`` as a ``CancellableTransport`` with the same settings (another kind is returned as is)."""
    if type(transport) is not StdlibTransport:
        return transport
    names = ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout", "max_connections", "verify",
             "ca_bundle", "user_agent", "proxy", "trust_env")
    settings = {name: getattr(transport, f"_{name}") for name in names if hasattr(transport, f"_{name}")}
    return CancellableTransport(**settings)


# --------------------------------------------------------------------------- hedging


class _Watchdog:
    """One daemon thread firing hedges at their deadlines (a heap; a resolved group's entry is skipped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Group]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, at: float, group: _Group) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="persona-dspy-hedges", daemon=True)
                self._thread.start()
            first = not self._heap or at < self._heap[0][0]
            heapq.heappush(self._heap, (at, next(self._seq), group))
            if first:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.perf_counter():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.perf_counter())
                _, _, group = heapq.heappop(self._heap)
            try:
                group.hedge()
            except Exception:  # a hedge that cannot start leaves the request to its first copy
                logger.exception("could not send a hedge")


_WATCHDOG = _Watchdog()


def _failure_kind(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        name = type(cause).__name__
        if isinstance(cause, TimeoutError) or name.endswith("Timeout"):
            return "timeout"
        cause = cause.__cause__
    return "connection"


class _Group:
    """One request and its hedges: the first answer wins, the others are abandoned (counted, their sockets shut)."""

    def __init__(self, server: ServerState, send_one: Callable[[Any], Any], request: Any,
                 counters: Sequence[Any]) -> None:
        self.server, self.send_one, self.request, self.counters = server, send_one, request, counters
        self.last_start = 0.0
        self.cond = threading.Condition()
        self.running: list[_Token] = []
        self.launched = 0
        self.resolved = False
        self.answer: Any = None
        self.failure: Any = None  # the last failed outcome: an HTTP response >= 400 or an exception

    def run_first(self) -> Any:
        token = self._start()
        assert token is not None
        self.last_start = token.started
        if self.server.hedge:  # a request sent before the latency is known is looked at again once it is
            _WATCHDOG.schedule(token.started + (self.server.hedge_delay() or HEDGE_FLOOR), self)
        try:
            self._attempt(token, caller=True)
            with self.cond:
                while not self.resolved:
                    self.cond.wait()
                # the copies cancelled for the answer stop at once (their sockets are shut): wait for them to count
                # themselves, so that the caller's counts are complete when it reads them
                deadline = time.perf_counter() + 1.0
                while self.running and time.perf_counter() < deadline:
                    self.cond.wait(deadline - time.perf_counter())
        except BaseException:  # Ctrl-C in the caller: nothing more is sent, nothing is left running
            self._abandon_all(token)
            raise
        if self.answer is not None:
            return self.answer
        if isinstance(self.failure, BaseException):
            raise mark_counted(self.failure)
        return self.failure

    def _start(self) -> _Token | None:
        """A new copy in flight, or None when the group is resolved or has sent its hedges."""
        with self.cond:
            if self.resolved or self.launched > MAX_HEDGES:
                return None
            token = _Token()
            token.index = self.launched
            self.running.append(token)
            self.launched += 1
        with self.server.lock:
            self.server.in_flight += 1
        return token

    def hedge(self) -> None:
        """Called by the watchdog: send the request again if it is still unanswered ``hedge_delay`` after the last
        copy was sent; look again later while the server's latency is unknown."""
        delay = self.server.hedge_delay()
        with self.cond:
            if self.resolved or self.launched > MAX_HEDGES:
                return
        now = time.perf_counter()
        due = None if delay is None else self.last_start + delay * 2 ** (self.launched - 1)
        if due is None or now < due:
            _WATCHDOG.schedule(due if due is not None else now + HEDGE_FLOOR, self)
            return
        token = self._start()
        if token is None:
            return
        self.last_start = token.started
        if self.launched <= MAX_HEDGES:
            _WATCHDOG.schedule(token.started + delay * 2 ** (self.launched - 1), self)
        threading.Thread(target=self._attempt, args=(token,), name="persona-dspy-hedge", daemon=True).start()

    def _abandon_all(self, mine: _Token) -> None:
        """Cancel every copy; the caller's own (interrupted on this thread) is counted here, the others count
        themselves as they end."""
        with self.cond:
            self.resolved = True
            running = list(self.running)
            self.cond.notify_all()
        for token in running:
            token.cancel()
        if mine in running:
            with self.cond:
                self.running.remove(mine)
            if mine.sent:
                count_request(self.counters, "abandoned")

    def _attempt(self, token: _Token, caller: bool = False) -> None:
        _CURRENT.token = token
        try:
            outcome: Any = self.send_one(self.request)
        except Exception as exc:  # the outcome of this copy; the group decides what the caller sees
            outcome = exc
        except BaseException as exc:  # Ctrl-C reaches the caller's thread only: a hedge's copy just ends
            if caller:
                raise
            outcome = exc
        finally:
            _CURRENT.token = None
            with self.server.lock:
                self.server.in_flight -= 1
        self._finish(token, outcome, time.perf_counter() - token.started)

    def _finish(self, token: _Token, outcome: Any, seconds: float) -> None:
        answered = not isinstance(outcome, BaseException) and getattr(outcome, "status", 500) < 400
        with self.cond:
            if token not in self.running:  # the caller's own copy, interrupted: counted by _abandon_all
                return
            self.running.remove(token)
            if token.cancelled:  # abandoned for an answer: it counts if the server had it
                kind = "abandoned" if token.sent else None
            elif answered and self.answer is None:
                kind, self.answer = "", outcome
            elif answered:
                kind = "abandoned"
            else:
                kind = _failure_kind(outcome) if isinstance(outcome, BaseException) else "http_error"
                self.failure = outcome
            losers = [t for t in self.running if not t.cancelled] if self.answer is not None else []
            if self.answer is not None or not self.running:
                self.resolved = True
            self.cond.notify_all()
        if kind or token.index:
            logger.debug("request copy %d of %d: %s after %.2f s", token.index + 1, self.launched, kind or "answered",
                         seconds)
        if kind is not None:
            count_request(self.counters, kind or None)
        if kind == "":
            self.server.record(seconds)
        for loser in losers:
            loser.cancel()


def send(base_url: str, send_one: Callable[[Any], Any], request: Any) -> Any:
    """Send ``request`` with ``send_one`` (the adapter's one HTTP request), counted, timed, hedged (module docstring).

    Returns the answer (an HTTP error response is returned as the adapter's own ``_send`` would); a transport error
    is raised, marked as counted.
    """
    server = server_state(base_url)
    timeout = server.read_timeout()
    if timeout is not None:
        request = replace(request, read_timeout=timeout)
    return _Group(server, send_one, request, active_request_counters()).run_first()
