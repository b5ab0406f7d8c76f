"""Client cost per LM call: the compile path against a bare OpenAI-SDK call, dspy's engines, and the compile before.

    python benchmarks/client_cost.py                 # 2 interleaved rounds, 32 workers, 0.25 s latency
    python benchmarks/client_cost.py --quick         # 1 round, fewer users and calls (a smoke run)

Every variant runs in a fresh process of its own against the test suite's scripted OpenAI-compatible server on
127.0.0.1 (``tests/loopback_server.py``), which waits a fixed latency before each answer; rounds interleave the
variants, so a change in the machine's load hits all of them alike. Per variant: client CPU per LM call (the
process's user + system CPU time over the measured phase, divided by the calls the server answered in it: a figure
that stays honest on a busy machine, unlike wall time), users per minute, and the process's peak RSS.

* ``openai-sdk``: the bare OpenAI SDK (``client.chat.completions.create``) sending the compile's typical request
  (a LaMP_3 answer prompt with its JSON schema), the reply's JSON parsed; ``workers`` threads.
* ``dspy-native`` / ``dspy-litellm``: ``dspy.LM`` called with the same messages, on dspy's native engine (the
  package's ``openai-compatible`` provider) and through LiteLLM.
* ``compile-before``: ``compile_users`` as it was: LiteLLM (``PERSONA_DSPY_ENGINE=litellm``), the call counter
  installed as a context-level dspy callback, every answer's memory search re-run, the persona signature rebuilt
  before every answer (the three are switched back in the child process; the code is otherwise the same).
* ``compile-after``: ``compile_users`` as it is.

Users per minute for the raw clients is their call rate divided by the compile's LM calls per user: what the client
alone would allow. The bound is workers / (latency x calls per user). Prints a table and writes
benchmarks/results/client_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
for name, value in {"PERSONA_DSPY_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}.items():
    os.environ.setdefault(name, value)  # nothing fetched; the SDK child imports neither dspy nor the package

VARIANTS = ("openai-sdk", "dspy-native", "dspy-litellm", "compile-before", "compile-after")
MODEL = "bench-model"


# --------------------------------------------------------------------------- child side: one variant, one process

def _answered(api_base: str) -> int:
    root = api_base.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/_stats", timeout=30) as response:
        return int(json.loads(response.read())["answered"])


def _in_threads(workers: int, calls_each: int, call: Any) -> None:
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            for _ in range(calls_each):
                call()
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _raw_call(variant: str, api_base: str, request: dict[str, Any]) -> Any:
    """One LM call of the raw variants, with the compile's typical request."""
    messages, response_format = request["messages"], request["response_format"]
    if variant == "openai-sdk":
        import openai

        client = openai.OpenAI(base_url=api_base, api_key="local", max_retries=0, timeout=120)

        def call() -> None:
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=512, temperature=0,
                                                   response_format=response_format)
            json.loads(reply.choices[0].message.content)
        return call
    import dspy

    import persona_dspy.lm.native  # noqa: F401 - registers the openai-compatible provider

    if variant == "dspy-native":
        lm = dspy.LM(f"openai-compatible/{MODEL}", engine="lm15", api_base=api_base, api_key="local",
                     temperature=0, max_tokens=512, timeout=120, num_retries=0, cache=False)
    else:
        lm = dspy.LM(f"openai/{MODEL}", engine="litellm", api_base=api_base, api_key="local", temperature=0,
                     max_tokens=512, timeout=120, num_retries=0, cache=False)

    def call() -> None:
        json.loads(lm(messages=messages, response_format=response_format)[0])
    return call


def _switch_back_to_before() -> None:
    """The compile path before this change, in this process: see the module docstring."""
    import dspy
    from persona_dspy.signatures.task_signatures import task_signature

    from persona_dspy.agent import persona_agent
    from persona_dspy.agent.persona_agent import PersonaAgent
    from persona_dspy.jobs import alignment
    from persona_dspy.lm import adapters
    from persona_dspy.lm.usage import LMUsage

    os.environ["PERSONA_DSPY_ENGINE"] = "litellm"

    @contextlib.contextmanager
    def context_callback(self: LMUsage, *lms: Any) -> Any:
        with dspy.context(callbacks=[*dspy.settings.get("callbacks", []), self]):
            yield

    def fresh_answer_program(task: str, reasoning: bool) -> dspy.Module:
        rationale = dspy.OutputField(desc="${reasoning}", max_length=persona_agent.REASONING_MAX_CHARS)
        signature = task_signature(task)
        return dspy.ChainOfThought(signature, rationale_field=rationale) if reasoning else dspy.Predict(signature)

    LMUsage.counting = context_callback
    alignment.searches_reused = contextlib.nullcontext
    PersonaAgent.retrieve_ahead = lambda self, questions: None
    persona_agent.PersonaReasoning._with_instructions = lambda self, signature, text: signature.with_instructions(text)
    persona_agent._answer_program = fresh_answer_program
    adapters.BoundedJSONAdapter.format_system_message = dspy.JSONAdapter.format_system_message
    adapters.BoundedJSONAdapter._prepare_response_format = adapters.BoundedJSONAdapter._bounded_response_format
    PersonaAgent._guard = lambda self, text: self.persona_guard.apply(
        text, fallback=self.persona_guard.summary(self.reason.persona))


def _histories(task: str, n: int) -> list:
    """The compile benchmark's users: n distinct users cycled from the task's dev users."""
    from compile import dev_histories, replicate  # benchmarks/compile.py (it imports the package: compile runs only)

    return replicate(dev_histories(task), n)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    variant, api_base = args.child, args.api_base
    result: dict[str, Any] = {"variant": variant}
    if variant.startswith("compile"):
        if variant == "compile-before":
            _switch_back_to_before()
        from persona_dspy.jobs.compile import compile_users
        from persona_dspy.lm.build import build_lm
        from persona_dspy.memory.episodic import EpisodicMemory

        lm = build_lm(f"openai/{MODEL}", api_base=api_base, timeout=120, num_retries=0)
        lm("warm-up")  # first-call imports stay out of the measurement
        histories = _histories(args.task, args.users)
        with EpisodicMemory(":memory:") as memory, tempfile.TemporaryDirectory() as out:
            memory.add_histories(histories)
            before, cpu, wall = _answered(api_base), time.process_time(), time.perf_counter()
            summary = compile_users(histories, memory=memory, out_dir=out, lm=lm, workers=args.workers,
                                    progress=False, stop_when_perfect=False)
            cpu, wall, calls = time.process_time() - cpu, time.perf_counter() - wall, _answered(api_base) - before
        result.update(users=len(histories), compiled=summary.count("compiled"), failed=summary.count("failed"),
                      counted_calls=summary.lm_calls)
    else:
        request = json.loads(Path(args.request).read_text())
        call = _raw_call(variant, api_base, request)
        call()  # warm-up
        before, cpu, wall = _answered(api_base), time.process_time(), time.perf_counter()
        _in_threads(args.workers, args.calls_each, call)
        cpu, wall, calls = time.process_time() - cpu, time.perf_counter() - wall, _answered(api_base) - before
    result.update(calls=calls, cpu_s=round(cpu, 3), wall_s=round(wall, 3), rss_mb=_peak_rss_mb())
    return result


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries it over from the parent across fork and exec, so
    every child would report at least the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --------------------------------------------------------------------------- parent side: server, rounds, table

def typical_request(api_base: str, task: str, path: Path) -> None:
    """The request a compile sends most: a rag answer (retrieved passages, JSON schema), as the server received it."""
    import dspy

    from persona_dspy.agent.semantic_memory import initial_agent
    from persona_dspy.data.examples import interaction_examples
    from persona_dspy.lm.adapters import default_adapter
    from persona_dspy.lm.build import build_lm
    from persona_dspy.memory.episodic import EpisodicMemory

    history = _histories(task, 1)[0]
    lm = build_lm(f"openai/{MODEL}", api_base=api_base, timeout=120, num_retries=0)
    with EpisodicMemory(":memory:") as memory, dspy.context(lm=lm, adapter=default_adapter()):
        memory.add_histories([history])
        agent = initial_agent(history, memory, mode="rag")
        agent(**interaction_examples(history, 1)[0].inputs())
    root = api_base.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/_stats", timeout=30) as response:
        sent = json.loads(response.read())["requests"][-1]
    path.write_text(json.dumps({"messages": sent["messages"], "response_format": sent["response_format"]}))


def _child(variant: str, api_base: str, args: argparse.Namespace, request: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--api-base", api_base, "--task", args.task,
               "--workers", str(args.workers), "--users", str(args.users), "--calls-each", str(args.calls_each),
               "--request", str(request)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = round(load, 2), round(os.getloadavg()[0], 2)
    row["cpu_ms_per_call"] = round(1000 * row["cpu_s"] / max(row["calls"], 1), 2)
    print(f"  {variant:>15}: {row['cpu_ms_per_call']:6.2f} ms CPU/call, {row['calls']} calls in {row['wall_s']:.1f} s,"
          f" RSS {row['rss_mb']:.0f} MB, load {row['load_before']:.1f}->{row['load_after']:.1f}", flush=True)
    return row


def summarise(rows: list[dict[str, Any]], latency: float, workers: int) -> list[dict[str, Any]]:
    """One line per variant over the rounds: CPU per call (total CPU / total calls), users/min, ratios, RSS."""
    compiles = [r for r in rows if r["variant"].startswith("compile")]
    calls_per_user = sum(r["calls"] for r in compiles) / max(sum(r["users"] for r in compiles), 1)
    bound = workers / (latency * calls_per_user) * 60 if calls_per_user else 0.0
    table = []
    for variant in VARIANTS:
        own = [r for r in rows if r["variant"] == variant]
        if not own:
            continue
        calls, cpu, wall = (sum(r[k] for r in own) for k in ("calls", "cpu_s", "wall_s"))
        users = (sum(r["users"] for r in own) if variant.startswith("compile") else calls / calls_per_user)
        table.append({"variant": variant, "rounds": len(own), "calls": calls,
                      "cpu_ms_per_call": round(1000 * cpu / calls, 2),
                      "cpu_ms_per_call_by_round": [r["cpu_ms_per_call"] for r in own],
                      "users_per_min": round(users / wall * 60, 1),
                      "fraction_of_bound": round(users / wall * 60 / bound, 3) if bound else None,
                      "rss_mb": max(r["rss_mb"] for r in own),
                      "load": f"{min(r['load_before'] for r in own):.1f}-{max(r['load_after'] for r in own):.1f}"})
    sdk = next((t["cpu_ms_per_call"] for t in table if t["variant"] == "openai-sdk"), None)
    for line in table:
        line["x_openai_sdk"] = round(line["cpu_ms_per_call"] / sdk, 2) if sdk else None
    return table, {"calls_per_user": round(calls_per_user, 2), "bound_users_per_min": round(bound, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", default="LaMP_3")
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--users", type=int, default=64, help="users per compile run")
    parser.add_argument("--calls-each", type=int, default=20, help="calls per worker thread in the raw variants")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "client_cost.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.quick:
        args.rounds, args.users, args.calls_each = 1, args.workers, 5
    from loopback_server import LoopbackServer

    from persona_dspy.evaluation.tables import format_table

    started, rows = time.time(), []
    with LoopbackServer(latency=args.latency, max_seconds=7200) as server, tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        server.reset()
        typical_request(server.api_base, args.task, request)
        server.reset(latency=args.latency)
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no} ({args.workers} workers, {args.latency:.2f} s latency):", flush=True)
            order = args.variants if round_no % 2 else list(reversed(args.variants))
            rows += [{**_child(variant, server.api_base, args, request), "round": round_no} for variant in order]
    table, bound = summarise(rows, args.latency, args.workers)
    print(f"\nClient cost per LM call ({args.workers} workers, {args.latency:.2f} s latency, {args.task}; "
          f"{bound['calls_per_user']} LM calls per user, bound {bound['bound_users_per_min']} users/min)")
    print(format_table([{k: v for k, v in t.items() if k != "cpu_ms_per_call_by_round"} for t in table]))
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "created": datetime.now().isoformat(timespec="seconds"), "seconds": round(time.time() - started, 1),
              "settings": {"task": args.task, "latency_s": args.latency, "workers": args.workers,
                           "users_per_compile": args.users, "calls_each": args.calls_each, "rounds": args.rounds},
              **bound, "table": table, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
