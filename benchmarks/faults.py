"""Fault benchmark: what injected server faults cost a many-user compile, and whether every request is counted.

    python benchmarks/faults.py                 # 30 LaMP_3 dev users, 4 workers: baseline, 10% 30 s hangs, 20% 500s
    python benchmarks/faults.py --users 10      # fewer users, for a smoke run

Runs ``persona-dspy compile`` (a subprocess, as a user would) against the test suite's scripted OpenAI-compatible
server on 127.0.0.1 (``tests/loopback_server.py``), which answers with the offline stand-in and injects faults:
``--hang-rate`` of the calls held ``--hang-seconds`` (a request the client abandons stops when it disconnects),
``--fail-rate`` answered with HTTP 500. Each scenario compiles the same users afresh (``--force``) into its own
folder, with the memory ingested once beforehand. Reports per scenario: wall seconds and its ratio to the baseline,
LM calls, the requests compile_summary.json reports and the requests the server received (equal when every request
is counted), the server's hangs and disconnected clients, and the machine's load average before and after.
Writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from loopback_server import LoopbackServer  # noqa: E402

DATA = Path("/work/shared/lamp/LaMP_3")
SCENARIOS = {
    "baseline": {},
    "hangs_10pct_30s": {"hang_rate": 0.1, "hang_seconds": 30.0},
    "http500_20pct": {"fail_rate": 0.2},
}


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persona_dspy.cli", *argv], env=env, cwd=REPO, text=True,
                          capture_output=True, check=False)


def run(users: int, workers: int, data: Path, scenarios: list[str], seed: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="pd-faults-"))
    env = {**os.environ, "PERSONA_DSPY_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    from persona_dspy.data.lamp import load_dataset

    ids = [h.user_id for h in load_dataset(data)][:users]
    common = ["--task", "LaMP_3", "--data", str(data), "--memory", str(home / "memory"), "--users", *ids]
    ingest = _cli("ingest", *common, env=env)
    if ingest.returncode != 0:
        raise SystemExit(f"ingest failed:\n{ingest.stderr[-2000:]}")
    rows = []
    with LoopbackServer(max_seconds=7200) as server:
        for name in scenarios:
            server.reset(seed=seed, **SCENARIOS[name])
            out = home / f"programs-{name}"
            load_before = os.getloadavg()
            started = time.perf_counter()
            done = _cli("compile", *common, "--lm", "openai/test-model", "--api-base", server.api_base, "--out",
                        str(out), "--workers", str(workers), "--force", "--no-progress", env=env)
            seconds = time.perf_counter() - started
            stats = server.stats()
            summary = json.loads((out / "compile_summary.json").read_text())
            rows.append({
                "scenario": name, **SCENARIOS[name], "exit_code": done.returncode, "wall_seconds": round(seconds, 2),
                "compiled": summary["compiled"], "failed": summary["failed"], "lm_calls": summary["lm_calls"],
                "requests_reported": summary["requests"], "requests_received": stats["chat_requests"],
                "failed_requests": summary["output_totals"].get("failed_requests"),
                "server_500s": stats["failures"], "server_hangs": stats["hangs"],
                "server_disconnected": stats["disconnected"],
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
            })
            print(json.dumps(rows[-1]), flush=True)
    base = next((r["wall_seconds"] for r in rows if r["scenario"] == "baseline"), None)
    for row in rows:
        row["x_baseline"] = round(row["wall_seconds"] / base, 2) if base else None
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "users": len(ids), "workers": workers,
            "data": str(data), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DATA if DATA.is_dir() else None,
                        help="a LaMP_3 folder (default: the shared dev data, else the shipped sample)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args()
    if args.data is None:
        from persona_dspy.data.lamp import dataset_dir

        args.data = dataset_dir("LaMP_3")
    report = run(args.users, args.workers, args.data, args.scenarios, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["rows"]:
        print(f"{row['scenario']:>18}: {row['wall_seconds']:7.1f} s ({row['x_baseline']}x), {row['lm_calls']} calls, "
              f"{row['requests_reported']} requests reported / {row['requests_received']} received, "
              f"load {row['load_before'][0]} -> {row['load_after'][0]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
