"""A pool of model servers behind one dspy LM: each call goes to one server, failures are retried elsewhere.

One GPU server answers a bounded number of calls at once; a compile of many users wants several. ``--api-base``
may name several servers (``http://a:8000/v1,http://b:8000/v1``) or a file listing them (one URL per line, ``#``
comments); ``lm.build`` then returns a ``dspy.LM`` whose engine is a ``ServerPool``:

* one ``dspy.LM`` per server, built by ``lm.build`` as for a single server, so the pool works whatever engine
  dspy uses for that server (LiteLLM or its native one): the pool hands each server LM dspy's own request;
* at most ``max_in_flight`` calls per server at once; a call goes to the healthy server with the fewest calls in
  flight (ties in turn), and waits when every server is full;
* a server whose call fails with a server-side error (connection refused, timeout, HTTP 5xx, rate limit) is taken
  out for ``cooldown`` seconds (doubling on each further failure, at most ``max_cooldown``) and the call is
  retried on another server; a request the server rejects as such (bad request, context too long, auth) is
  raised at once without blaming the server. When every server is out, a call waits for the first to come back.

The outer LM keeps dspy's cache, callbacks and history (one entry per call, whichever server answered); the
server LMs run with no retries, no cache, no callbacks and no active counter, so a call is counted once; each
HTTP request they send is counted where the call was made (``usage.REQUESTS_KEY``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from persona_dspy.lm.providers import LMConfigError
from persona_dspy.lm.redact import redact_url
from persona_dspy.lm.usage import ACTIVE_KEY, REQUESTS_KEY, active_request_counters

if TYPE_CHECKING:
    import dspy

logger = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_COOLDOWN = 15.0
DEFAULT_MAX_COOLDOWN = 120.0
_SERVER_FAULTS = ("LMServerError", "LMTimeoutError", "LMTransportError", "LMRateLimitError")
"""dspy's errors that say the server (not the request) failed: another server may well answer."""
_REQUEST_FAULTS = ("LMError",)
"""Any other dspy LM error (bad request, context too long, auth, configuration) is the request's: raised as is."""


def is_server_fault(exc: BaseException) -> bool:
    """Whether a failed call says the server is unwell (retry elsewhere) rather than the request is wrong."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(_SERVER_FAULTS):
        return True
    return not names & set(_REQUEST_FAULTS) and isinstance(exc, (OSError, ConnectionError, TimeoutError))


@dataclass
class _Server:
    url: str
    lm: Any
    in_flight: int = 0
    failures: int = 0  # consecutive
    out_until: float = 0.0
    calls: int = 0
    errors: int = 0


class ServerPool:
    """A dspy engine (``complete(request)``) spreading calls over one LM per server; see the module docstring."""

    def __init__(self, servers: Sequence[tuple[str, Any]], *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 cooldown: float = DEFAULT_COOLDOWN, max_cooldown: float = DEFAULT_MAX_COOLDOWN,
                 retries: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        if not servers:
            raise LMConfigError("a server pool needs at least one server")
        if max_in_flight < 1 or cooldown < 0 or retries < 0:
            raise LMConfigError(f"max_in_flight must be >= 1, cooldown and retries >= 0; got {max_in_flight}, "
                                f"{cooldown}, {retries}")
        self.servers = [_Server(url, lm) for url, lm in servers]
        self.max_in_flight = max_in_flight
        self.cooldown = cooldown
        self.max_cooldown = max(max_cooldown, cooldown)
        self.attempts = len(self.servers) + retries
        self._clock = clock
        self._cond = threading.Condition()
        self._turn = 0

    # -- what dspy's adapters ask a custom engine (the first server's answers stand for all) --------
    @property
    def supports_response_schema(self) -> bool:
        return bool(getattr(self.servers[0].lm, "supports_response_schema", False))

    @property
    def supports_function_calling(self) -> bool:
        return bool(getattr(self.servers[0].lm, "supports_function_calling", False))

    @property
    def supports_reasoning(self) -> bool:
        return bool(getattr(self.servers[0].lm, "supports_reasoning", False))

    @property
    def supported_params(self) -> set[str]:
        return set(getattr(self.servers[0].lm, "supported_params", ()) or ())

    # -- the engine ----------------------------------------------------------------------------
    def complete(self, request: Any) -> Any:
        import dspy

        tried: set[int] = set()
        last: BaseException | None = None
        requests_to = active_request_counters()
        for _ in range(self.attempts):
            index = self._acquire(tried)
            server = self.servers[index]
            try:
                # The outer LM already counts, records and caches this call: the server LM must not again (its own
                # METER finds no active counter here).
                # Its HTTP requests still count where the call was made (REQUESTS_KEY).
                with dspy.context(callbacks=[], disable_history=True, usage_tracker=None,
                                  **{ACTIVE_KEY: (), REQUESTS_KEY: requests_to}):
                    response = server.lm(request)
            except Exception as exc:
                fault = is_server_fault(exc)
                self._release(index, failed=fault)
                if not fault:
                    raise
                logger.warning("server %s failed (%s: %s); taken out for a while, retrying elsewhere",
                               redact_url(server.url), type(exc).__name__, str(exc)[:200])
                tried.add(index)
                last = exc
                continue
            self._release(index, failed=False)
            return response
        assert last is not None
        raise last

    def stream(self, request: Any) -> Any:
        raise NotImplementedError("a server pool does not stream; call without stream=True")

    def close(self) -> None:
        for server in self.servers:
            close = getattr(server.lm, "close", None)
            if callable(close):
                close()

    def _acquire(self, tried: set[int]) -> int:
        """A server for the next attempt: healthy, below its in-flight bound, untried by this call if possible."""
        with self._cond:
            while True:
                now = self._clock()
                free = [i for i, s in enumerate(self.servers) if s.in_flight < self.max_in_flight]
                healthy = [i for i in free if self.servers[i].out_until <= now]
                fresh = [i for i in healthy if i not in tried] or healthy
                if fresh:
                    self._turn += 1
                    n = len(self.servers)
                    index = min(fresh, key=lambda i: (self.servers[i].in_flight, (i - self._turn) % n))
                    self.servers[index].in_flight += 1
                    self.servers[index].calls += 1
                    return index
                if free:  # every free server is out: wait for the first to come back
                    wake = min(self.servers[i].out_until for i in free) - now
                    self._cond.wait(timeout=max(wake, 0.01))
                else:
                    self._cond.wait(timeout=1.0)

    def _release(self, index: int, *, failed: bool) -> None:
        with self._cond:
            server = self.servers[index]
            server.in_flight -= 1
            if failed:
                server.failures += 1
                server.errors += 1
                pause = min(self.cooldown * 2 ** (server.failures - 1), self.max_cooldown)
                server.out_until = self._clock() + pause
            else:
                server.failures = 0
            self._cond.notify_all()

    # -- reports -------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Per server (URL without credentials): calls sent, errors, calls in flight, whether it is out now."""
        with self._cond:
            now = self._clock()
            return [{"api_base": redact_url(s.url), "calls": s.calls, "errors": s.errors, "in_flight": s.in_flight,
                     "out": s.out_until > now} for s in self.servers]

    def server_urls(self) -> list[str | None]:
        """The servers, without credentials (``describe_lm`` records them in reports and program files)."""
        return [redact_url(s.url) for s in self.servers]

    def dump_state(self) -> dict[str, Any]:
        return {"servers": self.server_urls(), "max_in_flight": self.max_in_flight}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> ServerPool:
        raise ValueError("a server pool is built from its servers (lm.build), not loaded from a saved state")


def pool_lm(per_server: Sequence[tuple[str, Any]], *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
            cooldown: float = DEFAULT_COOLDOWN, retries: int = 3, cache: bool = False,
            callbacks: list[Any] | None = None) -> dspy.LM:
    """One ``dspy.LM`` over ``per_server`` (URL, that server's LM, built by ``lm.build`` with no retries and no
    cache): see the module docstring. ``retries``: the pool's retries beyond one attempt per server."""
    import dspy

    if not per_server:
        raise LMConfigError("a server pool needs at least one server")
    first = per_server[0][1]
    pool = ServerPool(per_server, max_in_flight=max_in_flight, cooldown=cooldown, retries=retries)
    lm = dspy.LM(first.model, engine=pool, temperature=first.kwargs.get("temperature"),
                 max_tokens=first.kwargs.get("max_tokens"), num_retries=0, cache=cache, callbacks=callbacks)
    logger.info("built a pool of %d servers for %s (at most %d calls in flight each)", len(per_server), first.model,
                max_in_flight)
    return lm
