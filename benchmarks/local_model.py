"""Speed of the local model path: the package's own calls against raw llama.cpp on the same prompts.

1. The package answers LaMP_2N test queries through PersonaAgent (retrieval, dspy's JSON adapter, litellm, the
   embedded server); every request it sent is recorded. The same requests (messages, max_tokens, temperature,
   JSON schema) are then replayed raw over HTTP against the same server. Rounds alternate (package, raw, package,
   raw) so drift on a shared machine hits both alike. Overhead = package wall time / raw wall time - 1
   (target: at most 10 %).
2. Prompt cache: the raw replay with llama.cpp's ``cache_prompt`` on and off.
3. Slots and threads: two concurrent raw replays against 1 and 2 slots, and single requests at 1 and 2 threads.

    python benchmarks/local_model.py [--users 3] [--rounds 2]

Prints tables and writes benchmarks/results/local_model.json. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402

from persona_dspy.agent.persona_agent import PersonaAgent  # noqa: E402
from persona_dspy.data.examples import query_examples  # noqa: E402
from persona_dspy.data.lamp import load_dataset  # noqa: E402
from persona_dspy.evaluation.tables import format_table  # noqa: E402
from persona_dspy.files import write_atomically  # noqa: E402
from persona_dspy.lm.adapters import default_adapter  # noqa: E402
from persona_dspy.lm.build import build_lm  # noqa: E402
from persona_dspy.lm.local_server import LocalServer, ServerSettings, stop_all  # noqa: E402
from persona_dspy.lm.models import resolve_model  # noqa: E402
from persona_dspy.memory.episodic import EpisodicMemory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def wire_request(entry: dict[str, Any]) -> dict[str, Any]:
    """The JSON body the package sent for one call, rebuilt from dspy's history entry."""
    kwargs = entry["kwargs"]
    body: dict[str, Any] = {"model": "local", "messages": entry["messages"],
                            "max_tokens": kwargs.get("max_tokens"), "temperature": kwargs.get("temperature", 0.0)}
    response_format = kwargs.get("response_format")
    if isinstance(response_format, type):  # dspy passes a pydantic model; litellm turns it into this
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": response_format.__name__, "schema": response_format.model_json_schema(), "strict": True}}
    elif response_format:
        body["response_format"] = response_format
    return body


def post(api_base: str, body: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(api_base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", f"{parts.path}/chat/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def replay(api_base: str, bodies: list[dict[str, Any]], **extra: Any) -> dict[str, float]:
    started = time.perf_counter()
    completion = prompt = 0
    for body in bodies:
        usage = post(api_base, {**body, **extra}).get("usage", {})
        completion += usage.get("completion_tokens", 0)
        prompt += usage.get("prompt_tokens", 0)
    wall = time.perf_counter() - started
    return {"seconds": wall, "completion_tokens": completion, "prompt_tokens": prompt}


def concurrent(api_base: str, bodies: list[dict[str, Any]], clients: int) -> float:
    """Wall time for ``clients`` threads each replaying ``bodies``."""
    threads = [threading.Thread(target=replay, args=(api_base, bodies)) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def package_round(lm: dspy.LM, agents: list[tuple[PersonaAgent, list[dspy.Example]]]) -> tuple[dict, list]:
    first = len(lm.history)
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=default_adapter()):
        for agent, examples in agents:
            for example in examples:
                agent(**example.inputs())
    wall = time.perf_counter() - started
    entries = lm.history[first:]
    completion = sum((e.get("usage") or {}).get("completion_tokens", 0) for e in entries)
    prompt = sum((e.get("usage") or {}).get("prompt_tokens", 0) for e in entries)
    return {"seconds": wall, "completion_tokens": completion, "prompt_tokens": prompt}, entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3, help="LaMP_2N dev users whose 3 queries are the workload")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "lamp" / "LaMP_2N")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "local_model.json")
    args = parser.parse_args(argv)

    histories = load_dataset(args.data)[: args.users]
    memory = EpisodicMemory(":memory:")
    memory.add_histories(histories)
    agents = [(PersonaAgent(h.task, memory, "rag", user_id=h.user_id), query_examples(h)) for h in histories]
    lm = build_lm("local", max_tokens=256, server={"slots": 1})
    api_base = lm.kwargs["api_base"]
    package_round(lm, agents[:1])  # warm-up: model pages, the prompt cache's first fill

    rows, bodies = [], None
    for round_ in range(args.rounds):
        measured, entries = package_round(lm, agents)
        bodies = bodies or [wire_request(e) for e in entries]
        raw = replay(api_base, bodies)
        for path, result in (("package (PersonaAgent + dspy + litellm)", measured), ("raw HTTP, same requests", raw)):
            rows.append({"round": round_ + 1, "path": path, "calls": len(bodies), **result,
                         "completion tok/s": result["completion_tokens"] / result["seconds"]})
    package = sum(r["seconds"] for r in rows if r["path"].startswith("package"))
    raw_total = sum(r["seconds"] for r in rows if r["path"].startswith("raw"))
    overhead = package / raw_total - 1
    print(format_table(rows, ["round", "path", "calls", "seconds", "prompt_tokens", "completion_tokens",
                              "completion tok/s"], digits=2))
    print(f"package overhead over raw llama.cpp: {overhead:+.1%} (target <= +10%)\n")

    cache_rows = []
    for cache in (True, False):
        result = replay(api_base, bodies, cache_prompt=cache)
        cache_rows.append({"cache_prompt": cache, **result})
    print(format_table(cache_rows, ["cache_prompt", "seconds", "prompt_tokens", "completion_tokens"], digits=2))
    stop_all()

    model = resolve_model(fetch=False)
    server_rows = []
    for threads, slots in ((1, 1), (1, 2), (2, 1), (2, 2)):
        with LocalServer(ServerSettings(model, slots=slots, threads=threads)) as server:
            single = replay(server.api_base, bodies[:3])
            two = concurrent(server.api_base, bodies[:3], clients=2)
            server_rows.append({"threads": threads, "slots": slots, "3 requests, 1 client (s)": single["seconds"],
                                "3 requests x 2 clients (s)": two,
                                "throughput gain of 2 clients": 2 * single["seconds"] / two})
    print(format_table(server_rows, ["threads", "slots", "3 requests, 1 client (s)", "3 requests x 2 clients (s)",
                                     "throughput gain of 2 clients"], digits=2))
    result = {"model": model.name, "requests": len(bodies), "rounds": rows, "overhead": overhead,
              "prompt_cache": cache_rows, "servers": server_rows}
    write_atomically(args.out, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
