"""Does llama.cpp stop a request whose client disconnected? Checked against the embedded server (xllamacpp) with the
real model, because hedging and timeouts rely on it: an abandoned request must not keep a slot busy.

    python benchmarks/llama_disconnect.py

One slot. Request A generates 400 tokens (``ignore_eos``); request B asks for 1 token and is timed. B waits for A
when A is still running on the only slot. Three timings: A alone; B sent right after A's client shut its socket one
second into A; B sent one second into A while A's client stays. When llama.cpp stops A as its client leaves, the
second is a fraction of a second and the third about A's length. Writes benchmarks/results/llama_disconnect.json.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from persona_dspy.lm.local_server import LocalServer, ServerSettings  # noqa: E402
from persona_dspy.lm.models import resolve_model  # noqa: E402

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _body(max_tokens: int) -> bytes:
    return json.dumps({"model": "local", "messages": [{"role": "user", "content": "Write a very long story."}],
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()


def _send_raw(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _timed_short(api_base: str) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(f"{api_base}/chat/completions", data=_body(1),
                                     headers={"Content-Type": "application/json"})
    _DIRECT.open(request, timeout=300).read()
    return time.perf_counter() - started


def main() -> None:
    with LocalServer(ServerSettings(resolve_model(None), slots=1)) as server:
        api_base = server.start()
        port = int(api_base.rsplit(":", 1)[1].split("/")[0])
        _timed_short(api_base)  # warm up
        started = time.perf_counter()
        sock = _send_raw(port, _body(400))
        sock.recv(1 << 20)
        alone = time.perf_counter() - started
        sock.close()
        sock = _send_raw(port, _body(400))
        time.sleep(1.0)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        after_leaving = _timed_short(api_base)
        sock = _send_raw(port, _body(400))
        time.sleep(1.0)
        while_staying = _timed_short(api_base)
        sock.close()
    report = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "load": list(os.getloadavg()),
              "a_alone_seconds": round(alone, 2), "b_after_a_client_left_seconds": round(after_leaving, 2),
              "b_while_a_client_stays_seconds": round(while_staying, 2),
              "stops_on_disconnect": after_leaving < alone / 4 < while_staying}
    out = REPO / "benchmarks" / "results" / "llama_disconnect.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
