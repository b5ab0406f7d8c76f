"""Compile benchmark: LM calls per user for each optimizer, and many-user compile throughput.

    python benchmarks/compile.py            # both parts
    python benchmarks/compile.py --quick    # fewer users, for a smoke run

Throughput runs `persona-dspy compile`'s engine (compile_users) over real HTTP against the test
suite's scripted OpenAI-compatible server on 127.0.0.1, which adds a fixed latency to every call.
Throughput runs with stop_when_perfect=False, so every user gets the full default budget of steps.
The bound for W workers is W / (latency x calls per user) users per second: the rate if every
worker always had a request in flight and nothing else took time. Calls per user are measured in
the same run. LM calls per optimizer are counted with a callback around each optimizer's compile
(offline stand-in LM: the counts are real, the scores are not a model's). Prints tables and writes
benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PERSONA_DSPY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from loopback_server import LoopbackServer  # noqa: E402

from persona_dspy.data.lamp import dataset_dir, load_dataset  # noqa: E402
from persona_dspy.evaluation.tables import format_table  # noqa: E402
from persona_dspy.jobs.compile import compile_users  # noqa: E402
from persona_dspy.lm.build import build_lm  # noqa: E402
from persona_dspy.memory.episodic import EpisodicMemory  # noqa: E402
from persona_dspy.testing.offline_lm import offline_lm  # noqa: E402

SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", REPO.parent / "shared"))


def dev_histories(task: str):
    folder = SHARED / "lamp" / task
    return load_dataset(folder if folder.is_dir() else dataset_dir(task))


def replicate(histories, n: int):
    """n users cycled from the dev users, each a distinct user id (separate memory, separate program)."""
    out = []
    for i in range(n):
        base = histories[i % len(histories)]
        out.append(dataclasses.replace(base, user_id=f"{base.user_id}#{i}"))
    return out


def bench_throughput(task: str, latency: float, workers_list: list[int], users_per_worker: int) -> list[dict]:
    rows = []
    base = dev_histories(task)
    with LoopbackServer(latency=latency, max_seconds=3600) as server:
        lm = build_lm("openai/bench-model", api_base=server.api_base, timeout=120, num_retries=0)
        lm("warm-up")  # litellm's first call in a process costs 1-2 s of imports: keep it out of the timings
        for workers in workers_list:
            histories = replicate(base, workers * users_per_worker)
            with EpisodicMemory(":memory:") as memory, tempfile.TemporaryDirectory() as out:
                memory.add_histories(histories)
                summary = compile_users(histories, memory=memory, out_dir=out, lm=lm, workers=workers,
                                        progress=False, stop_when_perfect=False)
            done = summary.count("compiled")
            calls_per_user = summary.lm_calls / max(done, 1)
            measured = done / summary.seconds * 60
            bound = workers / (latency * calls_per_user) * 60
            row = {"task": task, "workers": workers, "users": len(histories), "compiled": done,
                   "failed": summary.count("failed"), "latency_s": latency,
                   "calls_per_user": round(calls_per_user, 2), "seconds": summary.seconds,
                   "users_per_min": round(measured, 2), "bound_users_per_min": round(bound, 2),
                   "fraction_of_bound": round(measured / bound, 3)}
            rows.append(row)
            print(f"  {workers:>3} workers, {len(histories):>3} users: {measured:8.1f} users/min "
                  f"(bound {bound:8.1f}) = {row['fraction_of_bound']:.0%}; {calls_per_user:.1f} calls/user, "
                  f"{summary.seconds:.1f} s, failed {row['failed']}", flush=True)
    return rows


def bench_optimizer_calls(task: str, users: int) -> tuple[list[dict], dict]:
    """LM calls per user for each optimizer (offline stand-in), from the comparison harness."""
    from persona_dspy.jobs.comparison import DEFAULT_OPTIMIZERS, compare_optimizers
    from persona_dspy.jobs.comparison.contenders import gepa_spec

    histories = dev_histories(task)[:users]
    optimizers = (*DEFAULT_OPTIMIZERS, gepa_spec(auto="light", name="gepa_auto_light"))
    with EpisodicMemory(":memory:") as memory:
        memory.add_histories(histories)
        report = compare_optimizers(histories, memory=memory, lm=offline_lm(), optimizers=optimizers, progress=False)
    keys = ("optimizer", "status", "users_scored", "compile_calls_per_user", "eval_calls_per_user",
            "initial_persona_calls_per_user", "compile_tokens", "compile_seconds")
    rows = [{key: row[key] for key in keys} for row in report.rows()]
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows, {"users": len(histories)}


def print_table(title: str, rows: list[dict]) -> None:
    if rows:
        print(f"\n{title}\n{format_table(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--task", default="LaMP_3")
    parser.add_argument("--latencies", type=float, nargs="*", default=[0.25, 1.0],
                        help="seconds the server waits before each answer (one throughput table per value)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--users-per-worker", type=int, default=4)
    parser.add_argument("--optimizer-users", type=int, default=3, help="users for the per-optimizer call counts")
    parser.add_argument("--skip-optimizers", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile.json")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.users_per_worker, args.optimizer_users, args.latencies = [1, 8], 2, 1, [0.25]
    started = time.time()
    optimizer_rows: list[dict] = []
    if not args.skip_optimizers:
        print(f"LM calls per user per optimizer ({args.task}, offline stand-in):")
        optimizer_rows, _ = bench_optimizer_calls(args.task, args.optimizer_users)
    throughput = []
    for latency in args.latencies:
        print(f"compile throughput over HTTP (loopback, {latency:.2f} s per call):")
        throughput += bench_throughput(args.task, latency, args.workers, args.users_per_worker)
    print_table("LM calls per user, by optimizer", optimizer_rows)
    print_table("Compile throughput against the bound (workers / (latency x calls per user))", throughput)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "created": datetime.now().isoformat(timespec="seconds"), "seconds": round(time.time() - started, 1),
              "optimizers": optimizer_rows, "throughput": throughput}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
