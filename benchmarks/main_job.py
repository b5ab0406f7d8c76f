"""The README's main command as a user runs it: peak RSS and wall time of ``persona-dspy compile --task LaMP_3``.

Each run is the CLI in a subprocess on the embedded real model (``--lm local``, the default), its resident memory
sampled from ``/proc/<pid>/status`` every 0.2 s (the peak is the larger of the samples' maximum and the kernel's
``VmHWM``). The run's largest prompt and reply (tokens, from dspy's call history) are what the embedded server's
context per slot has to hold. ``--parts`` measures where the memory goes: the Python side after the imports, and the
embedded server's model, KV cache and compute buffers for a few slot and context sizes (RSS deltas of one process).

    python benchmarks/main_job.py --label after --max-users 2 [-- extra compile flags]
    python benchmarks/main_job.py --parts

Appends to benchmarks/results/main_job.json (machine load recorded with each run). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "main_job.json"

WRAPPER = """
import json, sys
from persona_dspy.cli import main
code = main(sys.argv[2:])
from dspy.clients.base_lm import GLOBAL_HISTORY
sizes = [(e.get("usage") or {}) for e in GLOBAL_HISTORY]
prompts = [u.get("prompt_tokens") or 0 for u in sizes]
totals = [(u.get("prompt_tokens") or 0) + (u.get("completion_tokens") or 0) for u in sizes]
json.dump({"calls_in_history": len(sizes), "max_prompt_tokens": max(prompts, default=0),
           "max_prompt_plus_reply_tokens": max(totals, default=0)}, open(sys.argv[1], "w"))
sys.exit(code)
"""

PARTS = """
import json, os, sys
def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
out = {"python": round(rss(), 1)}
import dspy, persona_dspy.jobs.compile, persona_dspy.cli.parser  # what a compile imports before the model
out["after imports"] = round(rss(), 1)
from persona_dspy.lm.local_server import LocalServer, ServerSettings
from persona_dspy.lm.models import resolve_model
slots, context = json.loads(sys.argv[1])
before = rss()
server = LocalServer(ServerSettings(resolve_model(fetch=False), slots=slots, context_per_slot=context))
server.start()
out[f"server {slots} slot(s) x {context} context"] = round(rss() - before, 1)
print(json.dumps(out), flush=True)
os._exit(0)
"""


def _status(pid: int) -> dict[str, float]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return values


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_compile(label: str, max_users: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PERSONA_DSPY_HOME": f"{tmp}/home", "PYTHONUNBUFFERED": "1",
               "PERSONA_DSPY_MODELS": os.environ.get("PERSONA_DSPY_MODELS", str(Path.home() / ".persona_dspy/models"))}
        env.pop("PERSONA_DSPY_LM", None)
        stats = f"{tmp}/history.json"
        command = [sys.executable, "-c", WRAPPER, stats, "compile", "--task", "LaMP_3", "--max-users", str(max_users),
                   "--no-progress", *extra]
        load_before, started = _load(), time.monotonic()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, timeline = 0.0, []
        while proc.poll() is None:
            sample = _status(proc.pid)
            peak = max(peak, sample.get("VmRSS", 0.0), sample.get("VmHWM", 0.0))
            if not timeline or time.monotonic() - started - timeline[-1][0] >= 10:
                timeline.append((round(time.monotonic() - started, 1), round(sample.get("VmRSS", 0.0), 1)))
            time.sleep(0.2)
        stdout, stderr = proc.communicate()
        seconds = time.monotonic() - started
        history = json.loads(Path(stats).read_text()) if Path(stats).exists() else {}
        summary_path = Path(f"{tmp}/home/programs/LaMP_3/compile_summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"label": label, "when": datetime.now(UTC).isoformat(timespec="seconds"), "exit_code": proc.returncode,
            "command": ["persona-dspy", *command[4:]], "max_users": max_users, "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak, 1), "rss_timeline_mib": timeline, "lm_calls": summary.get("lm_calls"),
            "compiled": summary.get("compiled"), "failed": summary.get("failed"),
            "local_server": (summary.get("lm") or {}).get("local_server"), **history,
            "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
            "stderr_tail": stderr.strip().splitlines()[-3:]}


def measure_parts(configs: list[tuple[int, int]]) -> dict:
    """RSS of the imports, then of the embedded server per configuration (each in a fresh process)."""
    result: dict = {"label": "parts (MiB)", "when": datetime.now(UTC).isoformat(timespec="seconds"),
                    "load_before": _load()}
    for config in configs:
        proc = subprocess.run([sys.executable, "-c", PARTS, json.dumps(config)], cwd=REPO, capture_output=True,
                              text=True, check=True)
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {**result, "load_after": _load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run")
    parser.add_argument("--max-users", type=int, default=2)
    parser.add_argument("--parts", action="store_true", help="measure the memory parts instead of a compile")
    parser.add_argument("extra", nargs="*", help="extra compile flags (after --)")
    args = parser.parse_args()
    if args.parts:
        result = measure_parts([(1, 2048), (1, 4096), (1, 8192), (2, 8192), (4, 8192)])
    else:
        result = run_compile(args.label, args.max_users, args.extra)
    print(json.dumps(result, indent=2))
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*runs, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
