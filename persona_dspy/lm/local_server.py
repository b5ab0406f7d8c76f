"""The embedded local model: llama.cpp's OpenAI-compatible server (xllamacpp) in this process, on 127.0.0.1.

The package talks to it like to any other server, so the default path and a GPU server are the same code; it serves
from C++ threads, so Python threads answering users in parallel are not held back by the GIL. Defaults: one
llama.cpp thread per spare core (all cores collapse when another process is busy: OpenMP spin-waits, hence
``OMP_WAIT_POLICY=PASSIVE`` too); one slot (on a CPU a second slot adds no throughput, only its own KV cache); 4,096
context tokens (the largest prompt a LaMP compile builds plus its reply, with room; a prompt that does not fit is
refused, never cut); and llama.cpp's host-memory prompt cache capped at ``cache_ram_mib`` (``docs/main-job.md``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_dspy.lm.cancel import allow, cancel

logger = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "local"
"""The model name the embedded server is addressed by (``openai/local``)."""
DEFAULT_CONTEXT_PER_SLOT = 4096
DEFAULT_CACHE_RAM_MIB = 256
STOP_WAIT = 3.0
"""Seconds ``stop`` waits for llama.cpp to let go of cancelled requests."""
HANDLER_POLL = 1.5
"""llama.cpp's HTTP handler checks its client's connection once a second, plus a margin."""
_LEFT_RUNNING: list[Any] = []
"""Servers still serving when they were stopped: kept referenced, so that no thread runs their destructor."""


class LocalServerError(RuntimeError):
    """The embedded server could not start or answer; the message says why and what to do."""


def default_threads() -> int:
    """llama.cpp threads: every core but one for the client (at least one); see the module docstring."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class ServerSettings:
    """How the embedded server runs. ``port=0`` picks a free port; ``gpu_layers=-1`` offloads all (GPU builds)."""

    model_path: Path
    port: int = 0
    slots: int = 1
    context_per_slot: int = DEFAULT_CONTEXT_PER_SLOT
    threads: int = 0  # 0: default_threads()
    prompt_cache: bool = True
    gpu_layers: int = 0
    host: str = "127.0.0.1"
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB

    def describe(self) -> dict[str, Any]:
        return {"model_path": str(self.model_path), "port": self.port, "slots": self.slots,
                "context_per_slot": self.context_per_slot, "threads": self.threads or default_threads(),
                "prompt_cache": self.prompt_cache, "gpu_layers": self.gpu_layers, "cache_ram_mib": self.cache_ram_mib}


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise LocalServerError(f"model file {path} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise LocalServerError(f"{path} is not a GGUF model file (llama.cpp serves GGUF only)")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LocalServerError(f"port {port} on {host} is in use ({exc.strerror}): choose another with "
                                   "--server-port, or 0 for any free port") from exc


class LocalServer:
    """One embedded llama.cpp server. ``start()`` returns once it answers; ``stop()`` (or ``with``) ends it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._server: Any = None
        self._lock = threading.Lock()
        self.api_base: str | None = None

    def start(self) -> str:
        """Load the model and serve; returns the OpenAI api_base (``http://127.0.0.1:<port>/v1``)."""
        with self._lock:
            if self._server is not None:
                return str(self.api_base)
            settings = self.settings
            _check_model_file(settings.model_path)
            if settings.port:
                _check_port_free(settings.host, settings.port)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # only effective before llama.cpp's OpenMP loads
            try:
                import xllamacpp
            except ImportError as exc:
                raise LocalServerError("the embedded model server needs xllamacpp: pip install xllamacpp") from exc
            params = xllamacpp.CommonParams()
            params.model.path = str(settings.model_path)
            params.hostnames = [settings.host]
            params.port = settings.port
            params.n_parallel = settings.slots
            params.n_ctx = settings.context_per_slot * settings.slots  # llama.cpp splits n_ctx over the slots
            threads = settings.threads or default_threads()
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
            params.cache_prompt = settings.prompt_cache
            params.cache_ram_mib = settings.cache_ram_mib
            params.n_gpu_layers = settings.gpu_layers
            params.endpoint_metrics = True  # requests processed and queued: ``stop`` waits for none
            params.verbosity = 1 if logger.isEnabledFor(logging.DEBUG) else 0
            started = time.perf_counter()
            try:
                self._server = xllamacpp.Server(params)
            except RuntimeError as exc:  # xllamacpp says only "Failed to init server" for every cause
                raise LocalServerError(f"llama.cpp could not serve {settings.model_path} "
                                       f"(context {settings.context_per_slot} x {settings.slots} slots): {exc}; "
                                       "run with -v -v to see llama.cpp's log") from exc
            self.api_base = f"{self._server.listening_address.rstrip('/')}/v1"
            allow(self.api_base)
            logger.info("local model server %s ready in %.2f s (%s)", self.api_base, time.perf_counter() - started,
                        settings.describe())
            return self.api_base

    def stop(self, wait: float = STOP_WAIT) -> bool:
        """End the server: cancel the requests in flight (``lm.cancel``), wait until llama.cpp has let them go, then
        free the model and the port. False if requests were still being served after ``wait`` seconds: the server
        is then left to end with the process (destroying it would hang this thread, see ``lm.cancel``)."""
        with self._lock:
            if self._server is None:
                return True
            idle = self._quiesce(wait)
            if idle:
                self._server = None  # ~Server() stops the HTTP loop and frees the model and the port
                logger.info("local model server %s stopped", self.api_base)
            else:
                _LEFT_RUNNING.append(self._server)
                self._server = None
                logger.log(logging.WARNING if wait else logging.INFO, "the local model server %s still had "
                           "requests in flight %.0f s after they were cancelled; it ends with the process",
                           self.api_base, wait)
            self.api_base = None
            return idle

    def _quiesce(self, wait: float) -> bool:
        """Cancel this process's requests to the server until none is left waiting for a reply; False if that did
        not happen within ``wait`` seconds.

        Nothing waits once llama.cpp processes and queues nothing (its ``/metrics``). Otherwise its handlers notice a
        closed connection within ``HANDLER_POLL`` seconds and return, even while the slot still computes the
        cancelled reply (which the destructor does not wait for): so the server is done once no connection has been
        found for that long.
        """
        started = last_found = time.monotonic()
        while True:
            now = time.monotonic()
            if cancel(str(self.api_base)):
                last_found = now
            if _requests_in_server(str(self.api_base)) == 0 or now - last_found >= HANDLER_POLL:
                return True
            if now - started >= wait:
                return False
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._server is not None

    def props(self) -> dict[str, Any]:
        """llama.cpp's ``/props``: context per slot (``default_generation_settings.n_ctx``), ``total_slots`` ..."""
        if self.api_base is None:
            raise LocalServerError("the local model server is not running")
        return server_props(self.api_base)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _requests_in_server(api_base: str) -> int | None:
    """Requests llama.cpp is processing or has queued (its ``/metrics``), or None when it does not say."""
    root = api_base.rstrip("/").removesuffix("/v1")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy
    try:
        with direct.open(f"{root}/metrics", timeout=2.0) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    found = re.findall(r"^llamacpp:requests_(?:processing|deferred) (\S+)$", text, re.MULTILINE)
    return int(sum(float(value) for value in found)) if found else None


def server_props(api_base: str, timeout: float = 5.0) -> dict[str, Any]:
    """A llama.cpp server's ``/props`` (its root, not under ``/v1``)."""
    root = api_base.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/props", timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LocalServerError(f"no /props from {root}: {exc}") from exc


_SHARED: dict[ServerSettings, LocalServer] = {}
_SHARED_LOCK = threading.Lock()


def shared_server(settings: ServerSettings) -> LocalServer:
    """The process's running server for these settings (started on first use, stopped at exit or by stop_all).

    The task LM and the optimizer LM of one command share it, instead of loading the model twice.
    """
    with _SHARED_LOCK:
        server = _SHARED.get(settings)
        if server is None:
            server = _SHARED[settings] = LocalServer(settings)
        server.start()
        return server


def running() -> frozenset[ServerSettings]:
    """The settings of the shared servers running now (the CLI keeps them running when a command ends)."""
    with _SHARED_LOCK:
        return frozenset(_SHARED)


def stop_all(keep: frozenset[ServerSettings] = frozenset(), wait: float = STOP_WAIT) -> bool:
    """Stop every shared server but those in ``keep`` (the CLI calls it when a command ends, also on Ctrl-C and
    errors, keeping the servers its caller had started: ``main()`` run inside a notebook or a test).

    False if one was still serving cancelled requests after ``wait`` s (``LocalServer.stop``)."""
    with _SHARED_LOCK:
        stopped = [_SHARED.pop(settings).stop(wait) for settings in [s for s in _SHARED if s not in keep]]
    return all(stopped)


def left_running() -> bool:
    """Whether a server could not be stopped (it ends with the process; the CLI then exits without waiting)."""
    return bool(_LEFT_RUNNING)


atexit.register(stop_all)


def served_by(api_base: str | None) -> dict[str, Any] | None:
    """What a running shared server at ``api_base`` serves (model file and settings), for reports; else None."""
    with _SHARED_LOCK:
        for settings, server in _SHARED.items():
            if api_base and server.api_base == api_base.rstrip("/"):
                return {"model_file": settings.model_path.name, **settings.describe()}
    return None
