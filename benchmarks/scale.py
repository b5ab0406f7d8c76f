"""Scale benchmark: compile throughput with threads in one process against Ray worker processes, and the client's
CPU per LM call that sizes a million-user run.

    python benchmarks/scale.py            # latencies 0.25 s and 1 s, total concurrency 8 and 32
    python benchmarks/scale.py --quick    # one latency, one concurrency, fewer users

Every run compiles copies of the LaMP_3 dev users (distinct ids, so distinct memories and programs) over HTTP
against the test suite's scripted OpenAI-compatible server (tests/loopback_server.py) on 127.0.0.1, which waits a
fixed latency before each answer; the aligner runs without early stopping (stop_when_perfect=False), so every user
costs the same calls. Memories are ingested before the clock starts, for both engines.

- threads: ``compile_users`` with C threads in this process;
- ray: ``compile_on_ray`` with 2 worker processes x C/2 threads on a local cluster of 2 CPUs.
Bound: C / (latency x calls per user) users per second, the rate if every slot always had a call in flight.
Ray's fixed costs: ``ray.init`` of a local cluster, the first task (worker process start and imports), a no-op
task's round trip once warm, and the same small compile on cold then warm workers (their difference: what each
worker process pays once: imports, LiteLLM's first call). The throughput runs start on warm workers. Client CPU
per call: this process's CPU time (every thread) over LM calls, in a run with no latency (the server's own CPU
is another process's, reported apart). Load averages are recorded with every row: the machine is shared.
Prints tables and writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from compile import dev_histories, replicate  # noqa: E402  (the compile benchmark's users, reused)
from loopback_server import LoopbackServer  # noqa: E402

from persona_dspy.evaluation.tables import format_table  # noqa: E402
from persona_dspy.jobs.compile import compile_users  # noqa: E402
from persona_dspy.jobs.distributed import MemorySpec, compile_on_ray  # noqa: E402
from persona_dspy.lm.build import build_lm  # noqa: E402
from persona_dspy.lm.config import lm_config  # noqa: E402
from persona_dspy.memory.episodic import EpisodicMemory  # noqa: E402

MODEL = "openai/bench-model"
ALIGNER = {"stop_when_perfect": False}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), e.g. the loopback server's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def ingest(folder: Path, histories) -> None:
    with EpisodicMemory.for_task("LaMP_3", folder) as memory:
        memory.add_histories(histories)


def run_threads(server: LoopbackServer, histories, concurrency: int) -> dict:
    lm = build_lm(MODEL, server.api_base, timeout=120, num_retries=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mem"
        ingest(folder, histories)
        with EpisodicMemory.for_task("LaMP_3", folder) as memory:
            cpu0, server0 = time.process_time(), cpu_seconds(server._proc.pid)
            summary = compile_users(histories, memory=memory, out_dir=Path(tmp) / "out", lm=lm,
                                    workers=concurrency, progress=False, **ALIGNER)
            cpu, server_cpu = time.process_time() - cpu0, cpu_seconds(server._proc.pid) - server0
    return {"summary": summary, "client_cpu_s": cpu, "server_cpu_s": server_cpu}


def run_ray(server: LoopbackServer, histories, concurrency: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mem"
        ingest(folder, histories)
        server0 = cpu_seconds(server._proc.pid)
        summary = compile_on_ray(histories, out_dir=Path(tmp) / "out",
                                 lm=lm_config(MODEL, server.api_base, timeout=120, num_retries=0),
                                 memory=MemorySpec("LaMP_3", str(folder)), processes=processes,
                                 workers=concurrency // processes, progress=False, **ALIGNER)
        server_cpu = cpu_seconds(server._proc.pid) - server0
    return {"summary": summary, "client_cpu_s": None, "server_cpu_s": server_cpu}


def row(engine: str, latency: float, concurrency: int, measured: dict) -> dict:
    summary = measured["summary"]
    done = summary.count("compiled")
    calls_per_user = summary.lm_calls / max(done, 1)
    users_per_min = done / summary.seconds * 60
    bound = concurrency / (latency * calls_per_user) * 60 if latency > 0 else None
    out = {"engine": engine, "latency_s": latency, "concurrency": concurrency, "users": len(summary.results),
           "compiled": done, "failed": summary.count("failed"), "calls_per_user": round(calls_per_user, 2),
           "seconds": summary.seconds, "users_per_min": round(users_per_min, 1),
           "bound_users_per_min": round(bound, 1) if bound else None,
           "fraction_of_bound": round(users_per_min / bound, 3) if bound else None,
           "server_cpu_ms_per_call": round(1000 * measured["server_cpu_s"] / max(summary.lm_calls, 1), 2),
           "load_after": load()}
    if measured["client_cpu_s"] is not None:
        out["client_cpu_ms_per_call"] = round(1000 * measured["client_cpu_s"] / max(summary.lm_calls, 1), 2)
    if summary.cluster:
        out["ray_batches"] = summary.cluster["batches"]
        out["ray_first_batch_s"] = summary.cluster["first_batch_seconds"]
    print(f"  {engine:>7} C={concurrency:<3} {latency:.2f} s: {users_per_min:7.1f} users/min"
          + (f" = {out['fraction_of_bound']:.0%} of {bound:.1f}" if bound else "")
          + f"; {calls_per_user:.1f} calls/user, {summary.seconds:.1f} s, failed {out['failed']}, load {load()}",
          flush=True)
    return out


def ray_fixed_costs(processes: int) -> tuple[object, dict]:
    """Start a local cluster and measure what Ray costs before and around any work."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    ray.init(num_cpus=processes, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    init = time.perf_counter() - t0

    @ray.remote(num_cpus=1)
    def noop(x: int) -> int:
        return x

    @ray.remote(num_cpus=1)
    def cold_import() -> float:
        t = time.perf_counter()
        import persona_dspy.jobs.compile  # noqa: F401  what a worker imports before its first user
        import persona_dspy.lm.build  # noqa: F401

        return time.perf_counter() - t

    t0 = time.perf_counter()
    ray.get(noop.remote(0))
    first_task = time.perf_counter() - t0
    imports = max(ray.get([cold_import.remote() for _ in range(processes)]))
    ray.get([noop.remote(i) for i in range(20)])  # warm
    t0 = time.perf_counter()
    n = 200
    ray.get([noop.remote(i) for i in range(n)])
    per_task = (time.perf_counter() - t0) / n
    costs = {"ray_init_s": round(init, 2), "first_task_s": round(first_task, 2),
             "worker_imports_s": round(imports, 2), "noop_task_ms_warm": round(1000 * per_task, 2),
             "load": load()}
    print(f"Ray fixed costs: {costs}", flush=True)
    return ray, costs


def ray_warm_up(server: LoopbackServer, base, processes: int) -> dict:
    """The same small compile on Ray twice: cold (workers import dspy and LiteLLM and make their first calls), then
    warm; the difference is what a run pays once per worker process."""
    timings = {}
    for label in ("cold", "warm"):
        histories = replicate(base, 2 * processes)
        summary = run_ray(server, histories, processes, processes)["summary"]
        timings[f"{label}_s"] = summary.seconds
    out = {"users": 2 * processes, "threads_per_process": 1, **timings,
           "worker_start_up_s": round(timings["cold_s"] - timings["warm_s"], 2), "load": load()}
    print(f"Ray warm-up (same {2 * processes} users, cold then warm workers): {out}", flush=True)
    return out


def client_cpu_per_call(histories_base, concurrency: int, users: int) -> dict:
    """CPU of this process per LM call with no latency: what a compile costs the client, dspy and HTTP included."""
    with LoopbackServer(latency=0.0, max_seconds=3600) as server:
        lm = build_lm(MODEL, server.api_base, timeout=120, num_retries=0)
        lm("warm-up")
        measured = run_threads(server, replicate(histories_base, users), concurrency)
    summary = measured["summary"]
    calls = max(summary.lm_calls, 1)
    out = {"users": users, "concurrency": concurrency, "lm_calls": summary.lm_calls,
           "calls_per_user": round(summary.lm_calls / max(summary.count("compiled"), 1), 2),
           "client_cpu_ms_per_call": round(1000 * measured["client_cpu_s"] / calls, 2),
           "client_cpu_s_per_user": round(measured["client_cpu_s"] / max(summary.count("compiled"), 1), 3),
           "server_cpu_ms_per_call": round(1000 * measured["server_cpu_s"] / calls, 2),
           "seconds": summary.seconds, "load_after": load()}
    print(f"client CPU per call (no latency): {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latencies", type=float, nargs="*", default=[0.25, 1.0])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8, 32], help="total calls in flight")
    parser.add_argument("--rounds", type=int, default=3, help="users per slot of concurrency")
    parser.add_argument("--processes", type=int, default=2, help="Ray worker processes")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()
    if args.quick:
        args.latencies, args.concurrency, args.rounds = [0.25], [8], 2
    started, load_before = time.time(), load()
    base = dev_histories("LaMP_3")
    cpu = client_cpu_per_call(base, concurrency=8, users=24 if not args.quick else 8)
    ray, fixed = ray_fixed_costs(args.processes)
    rows = []
    try:
        for latency in args.latencies:
            with LoopbackServer(latency=latency, max_seconds=7200) as server:
                build_lm(MODEL, server.api_base)("warm-up")
                if "warm_up" not in fixed:
                    fixed["warm_up"] = ray_warm_up(server, base, args.processes)
                for concurrency in args.concurrency:
                    histories = replicate(base, concurrency * args.rounds)
                    rows.append(row("threads", latency, concurrency, run_threads(server, histories, concurrency)))
                    rows.append(row("ray", latency, concurrency,
                                    run_ray(server, histories, concurrency, args.processes)))
    finally:
        ray.shutdown()
    print(f"\nClient CPU per LM call\n{format_table([cpu])}")
    warm = fixed.pop("warm_up", None)
    print(f"\nRay fixed costs\n{format_table([fixed])}")
    if warm:
        print(f"\nRay worker start-up (a compile of the same users on cold, then warm workers)\n{format_table([warm])}")
        fixed["warm_up"] = warm
    print(f"\nThroughput against the bound (concurrency / (latency x calls per user))\n{format_table(rows)}")
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_before": load_before, "load_after": load()},
              "created": datetime.now().isoformat(timespec="seconds"), "seconds": round(time.time() - started, 1),
              "client_cpu": cpu, "ray_fixed_costs": fixed, "throughput": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
