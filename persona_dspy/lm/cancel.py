"""Cancelling this process's requests to one server: shut their connections down and refuse new ones.

The embedded llama.cpp server (``lm.local_server``) cannot be destroyed while it still serves a request: its
destructor waits for the request's HTTP handler while holding the GIL, so the whole process hangs (Ctrl-C included).
A handler gives up once its client's connection is closed (llama.cpp looks about once a second). So stopping the
server cancels first: every socket of this process connected to the server's address is shut down, whichever HTTP
client opened it and in whichever thread (a thread blocked reading the reply gets an error at once; closing the
socket alone would not wake it), and the package's own engine (``lm.native``) refuses to send new requests there
from then on, so that dspy's retries of the cancelled calls do not start new ones.

Sockets are found through the process's open file descriptors (``/proc/self/fd`` or ``/dev/fd``); where neither
exists (Windows) nothing is shut down and only new requests are refused.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_cancelled: set[tuple[str, int]] = set()


class RequestsCancelled(RuntimeError):
    """A request to a server whose requests were cancelled (the command is stopping)."""


def _address(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        return (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except ValueError:
        return None


def _peer_addresses(host: str, port: int) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return {host}


def _descriptors() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(folder) if name.isdigit()]
        except OSError:
            continue
    return []


def shutdown_connections(host: str, port: int) -> int:
    """Shut down (both ways) every TCP socket of this process connected to ``host:port``; returns how many."""
    peers = _peer_addresses(host, port)
    count = 0
    for fd in _descriptors():
        try:
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):  # not a socket, or closed meanwhile
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                peer = sock.getpeername()
                if peer[1] == port and peer[0] in peers:
                    sock.shutdown(socket.SHUT_RDWR)
                    count += 1
        except OSError:  # not connected (a listening socket), or closed meanwhile
            pass
        finally:
            sock.detach()  # the descriptor stays its owner's to close
    return count


def cancel(api_base: str) -> int:
    """Refuse new requests to ``api_base``'s host and port and shut down the open ones; returns how many."""
    address = _address(api_base)
    if address is None:
        return 0
    with _lock:
        _cancelled.add(address)
    count = shutdown_connections(*address)
    if count:
        logger.info("cancelled %d request(s) in flight to %s", count, api_base)
    return count


def allow(api_base: str) -> None:
    """Requests to ``api_base`` may be sent again (a server started anew on the same port)."""
    address = _address(api_base)
    with _lock:
        _cancelled.discard(address)


def check_allowed(url: str) -> None:
    """Raise ``RequestsCancelled`` when requests to ``url``'s host and port were cancelled."""
    if not _cancelled:
        return
    address = _address(url)
    with _lock:
        refused = address in _cancelled
    if refused:
        raise RequestsCancelled(f"requests to {url} were cancelled: the command is stopping")
