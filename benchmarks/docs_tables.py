"""Write every measured figure the docs show from ``benchmarks/results/``, so each number is written once.

    python benchmarks/docs_tables.py           # regenerate docs/benchmarks.md and the README's personalization table
    python benchmarks/docs_tables.py --check   # exit 1 if either is out of date with the results files

The benchmark scripts write JSON under ``benchmarks/results/``; this script renders them as Markdown tables into
``docs/benchmarks.md`` (generated whole) and into README.md between ``<!-- personalization:start -->`` and
``<!-- personalization:end -->``. A test runs ``--check``'s comparison, so a results file edited without
regenerating fails the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from personalization_table import markdown as personalization_markdown  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
START, END = "<!-- personalization:start -->", "<!-- personalization:end -->"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load(results: Path, name: str) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def personalization_table(results: Path, name: str = "personalization.json") -> str:
    return personalization_markdown(load(results, name)["rows"])


def personalization(results: Path) -> str:
    data = load(results, "personalization.json")
    records = [json.loads(line) for line in (results / "personalization.jsonl").read_text().splitlines() if line]
    scored = [r for r in records if "failed" not in r]
    adopted = {task: (sum(r["methods"]["persona_aligner"].get("alignment", {}).get("improved", False)
                          for r in scored if r["task"] == task), sum(r["task"] == task for r in scored))
               for task in data["users_run"]}
    changed = {task: sum(r["personas"]["initial_summary"] != r["personas"]["aligned_summary"]
                         for r in scored if r["task"] == task and "personas" in r) for task in data["users_run"]}
    overruled = {task: sum(p["prediction"] != p["lm_prediction"] for r in scored if r["task"] == task
                           for p in r["methods"]["initial_persona"]["predictions"]) for task in data["users_run"]}
    users = ", ".join(f"{task} {n} of {data['users_total'][task]}" for task, n in data["users_run"].items())
    return "\n".join([
        "## Personalization",
        "",
        "`python benchmarks/personalization.py` answers each dev user's held-out queries of the shared LaMP sets "
        "several ways: the non-personalized agent (mode `none`); the default agent with its initial persona (the "
        "summary from evidence, then `demos` answers), also scored on the model's own answers before the evidence "
        "check; PersonaAligner with compile's defaults starting from that persona; and, without any LM, the user's "
        "majority label and the 5-nearest votes over each query's own profile (BM25, and dense with the shared "
        "all-MiniLM-L6-v2). Intervals are 95 % bootstrap intervals over users "
        f"({data['bootstrap']} resamples); LM calls, tokens and seconds are per user, the persona summary counted "
        "in every persona row. `--report-only` rebuilds the table from the per-user results "
        "(`benchmarks/results/personalization.jsonl`).",
        "",
        f"LM: `{data['lm']}`, the embedded server ({data['note']}). Users: {users} (the first of each set; the "
        "rest were not run in the time the session had). The agent's retrieval: "
        f"`{data.get('retrieval')}` (BM25, what memory holds without `--dense`); aligner iterations: "
        f"{data.get('iterations')}. Seconds are per user on 2 cores shared with up to two other runs.",
        "",
        personalization_table(results),
        "",
        "PersonaAligner adopted a rewritten persona (its score on the held-back interactions must rise strictly) for "
        + ", ".join(f"{a} of {n} {task} users" for task, (a, n) in adopted.items()) + "; the saved summaries differ "
        "from the initial ones for " + ", ".join(f"{n} {task}" for task, n in changed.items()) + " users. "
        "The evidence check replaced the model's answer on " + ", ".join(f"{n} {task}" for task, n in
                                                                        overruled.items()) + " queries. "
        f"Saved personas failing the junk checks (repetition, copied history, placeholders...): "
        f"{data.get('persona_problems', 0)}.",
    ])


def personalization_rag(results: Path) -> str:
    data = load(results, "personalization_rag.json")
    users = ", ".join(f"{task} {n}" for task, n in data["users_run"].items())
    return "\n".join([
        "## Personalization before: memory as passages (`rag`)",
        "",
        "The same benchmark with the agent's earlier default, `rag` (retrieved items listed as context, chain of "
        "thought), the LM-written summary and PersonaAligner's earlier defaults (3 iterations, the recent "
        f"interactions as both feedback and validation slice). Users: {users}.",
        "",
        personalization_table(results, "personalization_rag.json"),
    ])
def local_model(results: Path) -> str:
    data = load(results, "local_model.json")
    rounds = [[r["round"], r["path"], r["calls"], f"{r['seconds']:.2f}", f"{r['prompt_tokens']:,}",
               f"{r['completion_tokens']:,}"] for r in data["rounds"]]
    cache = [["on" if r["cache_prompt"] else "off", f"{r['seconds']:.1f}"] for r in data["prompt_cache"]]
    servers = [[r["threads"], r["slots"], f"{r['3 requests, 1 client (s)']:.1f}",
                f"{r['3 requests x 2 clients (s)']:.1f}", f"{r['throughput gain of 2 clients']:.2f}x"]
               for r in data["servers"]]
    return "\n".join([
        "## Speed of the local model path",
        "",
        f"`python benchmarks/local_model.py`: {data['requests']} LaMP_2N `rag` answers through PersonaAgent "
        f"(retrieval, dspy's JSON adapter, the embedded server; model `{data['model']}`), against the same requests "
        "replayed raw over HTTP to the same server, rounds interleaved.",
        "",
        table(["round", "path", "calls", "seconds", "prompt tokens", "completion tokens"], rounds),
        "",
        f"Package overhead over raw llama.cpp: **{data['overhead']:+.1%}** (target: at most +10 %).",
        "",
        "The same requests with llama.cpp's prompt cache on and off (consecutive calls share the persona and the "
        "instructions):",
        "",
        table(["prompt cache", "seconds"], cache),
        "",
        "Threads and slots of the embedded server: 3 requests from 1 client, then from 2 clients at once (the second "
        "client sends the same requests, so part of its work is a cache hit):",
        "",
        table(["threads", "slots", "1 client (s)", "2 clients (s)", "throughput of 2 clients vs 1"], servers),
    ])


def client_cost(results: Path) -> str:
    parts = ["## Client cost per LM call", "",
             "`python benchmarks/client_cost.py` runs the same LM traffic five ways, each in a fresh process, against "
             "the scripted OpenAI-compatible server on 127.0.0.1 with a fixed latency per call: a bare OpenAI-SDK "
             "client and a bare `dspy.LM` on each engine sending the compile's typical request, and `compile_users` "
             "before and after the client-cost work (`before` switches back to LiteLLM, a context-level call counter, "
             "a search per answer and per-answer signature rebuilds). CPU per call is the process's CPU time over the "
             "calls the server answered; users/min of the raw clients is their call rate over the compile's calls per "
             "user; the bound is workers / (latency x calls per user)."]
    for name in ("client_cost.json", "client_cost_16_users.json"):
        if not (results / name).exists():
            continue
        data = load(results, name)
        s = data["settings"]
        rows = [[f"`{r['variant']}`", f"{r['cpu_ms_per_call']:.2f}", f"{r['x_openai_sdk']:.2f}",
                 f"{r['users_per_min']:.1f}", f"{r['fraction_of_bound']:.0%}", f"{r['rss_mb']:.0f} MB", r["load"]]
                for r in data["table"]]
        parts += ["", f"`{name}`: {s['task']}, {s['users_per_compile']} users on {s['workers']} workers, "
                  f"{s['latency_s']} s latency, {s['rounds']} rounds, {data['calls_per_user']} calls per user, bound "
                  f"{data['bound_users_per_min']} users/min; {data['machine']['cpus']} CPUs, {data['created']}.", "",
                  table(["variant", "CPU ms per LM call", "x bare SDK", "users/min", "of the bound", "peak RSS",
                         "load"], rows)]
    return "\n".join(parts)


def scale(results: Path) -> str:
    data = load(results, "scale.json")
    runs: dict[tuple[float, int], dict[str, dict[str, Any]]] = {}
    for r in data["throughput"]:
        runs.setdefault((r["latency_s"], r["concurrency"]), {})[r["engine"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{r['users_per_min']:.1f} = {r['fraction_of_bound']:.0%}"

    rows = [[f"{latency} s", c, f"{(e.get('threads') or e['ray'])['bound_users_per_min']:.1f}", cell(e.get("threads")),
             cell(e.get("ray"))] for (latency, c), e in runs.items()]
    cpu, fixed = data["client_cpu"], data["ray_fixed_costs"]
    machine = data["machine"]
    return "\n".join([
        "## Scale: threads against Ray",
        "",
        "`python benchmarks/scale.py` compiles copies of the LaMP_3 dev users against the scripted server with a "
        "fixed latency per call, the aligner's defaults without early stopping; Ray runs 2 worker processes x C/2 "
        "threads on a local 2-CPU cluster, started on warm workers. Bound: C / (latency x calls per user). "
        f"{machine['cpus']} CPUs, load {machine['load_before']} before and {machine['load_after']} after, "
        f"{data['created']}.",
        "",
        table(["latency per call", "concurrency C", "bound (users/min)", "threads, 1 process",
               "Ray, 2 processes x C/2 threads"], rows),
        "",
        f"Client CPU per LM call with no latency ({cpu['concurrency']} threads, {cpu['users']} users, "
        f"{cpu['calls_per_user']} calls each): **{cpu['client_cpu_ms_per_call']} ms** "
        f"({cpu['client_cpu_s_per_user']} s per user; the scripted server, another process, "
        f"{cpu['server_cpu_ms_per_call']} ms per call).",
        "",
        f"Ray's fixed costs: `ray.init` of a local cluster {fixed['ray_init_s']} s, a worker's imports "
        f"{fixed['worker_imports_s']} s, a warm no-op task {fixed['noop_task_ms_warm']} ms.",
    ])


def demos_study(results: Path) -> str:
    data = load(results, "demos_study.json")
    rows = []
    for r in data["rows"]:
        mae = r["metrics"].get("mae")
        rows.append([r["task"], f"`{r['setting']}`", r.get("users", "-"), "on" if r.get("prompt_cache") else "off",
                     r["queries"],
                     "-" if "accuracy" not in r["metrics"] else f"{r['metrics']['accuracy']:.3f}",
                     "-" if mae is None else f"{mae:.3f}",
                     f"{r['prompt_tokens_per_call']:,.0f}",
                     f"{r['seconds'] / max(1, r['queries']):.1f}"])
    return "\n".join([
        "## How memory reaches the model",
        "",
        "`python benchmarks/demos_study.py` answers the dev queries with PersonaAgent in one setting at a time and a "
        "persona holding only the template (no summary): `mode-kN-retrieval[-cot][-first][-cCHARS]`, where `demos` "
        "shows the N retrieved past items as user/assistant turns (most similar last; `-first`: most similar first), "
        "`-cot` adds the chain of thought, and `-cCHARS` cuts each item's text (default 600 characters). The first "
        "users of each set are answered (column users); the prompt cache column says whether llama.cpp's prompt "
        "cache was on. Seconds per query include the machine's load at the time (3 to 8 on 2 cores).",
        "",
        f"LM: `{data['lm'].get('model') if isinstance(data['lm'], dict) else data['lm']}`.",
        "",
        table(["task", "setting", "users", "prompt cache", "queries", "accuracy", "MAE", "prompt tokens per call",
               "seconds per query"], rows),
    ])


def main_job(results: Path) -> str:
    runs = json.loads((results / "main_job.json").read_text())
    rows = [[r["label"], r["when"][:16].replace("T", " "), r["max_users"], r["compiled"], r["lm_calls"],
             f"{r['seconds']:.0f}", f"{r['peak_rss_mib']:,.0f} MiB", r.get("max_prompt_plus_reply_tokens", "-"),
             f"{r['local_server'].get('slots')} x {r['local_server'].get('context_per_slot')}",
             " / ".join(f"{r[k][0]:.1f}" for k in ("load_before", "load_after"))]
            for r in runs if "seconds" in r]
    return "\n".join([
        "## The main job: time and memory",
        "",
        "`python benchmarks/main_job.py --label L --max-users N` runs the README's `persona-dspy compile --task "
        "LaMP_3` (the embedded model) in a subprocess, sampling its resident memory; each run is kept with the load "
        "average before and after (1-minute, 2 cores).",
        "",
        table(["run", "when (UTC)", "users", "compiled", "LM calls", "seconds", "peak RSS",
               "largest prompt + reply (tokens)", "server slots x context", "load before / after"], rows),
    ])


RENDERERS: dict[str, Callable[[Path], str]] = {
    "main_job.json": main_job,
    "demos_study.json": demos_study,
    "personalization.json": personalization, "personalization_rag.json": personalization_rag,
    "local_model.json": local_model, "client_cost.json": client_cost, "scale.json": scale}
HELPERS = ("docs_tables.py", "personalization_table.py")  # scripts here that are not benchmarks
RENDERED_WITH = {"personalization.jsonl": "personalization.json",
                 "personalization_rag.jsonl": "personalization_rag.json",
                 "client_cost_16_users.json": "client_cost.json"}


def benchmarks_page(results: Path = RESULTS) -> str:
    """docs/benchmarks.md: a section per results file; a file no renderer knows is named, never dropped."""
    names = sorted(p.name for p in results.iterdir() if p.suffix in (".json", ".jsonl"))
    sections = [render(results) for name, render in RENDERERS.items() if name in names]
    unknown = [n for n in names if n not in RENDERERS and n not in RENDERED_WITH]
    outputs = {s.name: re.search(r'"results" / "([\w.]+\.json)"', s.read_text())
               for s in sorted((REPO / "benchmarks").glob("*.py")) if s.name not in HELPERS}
    missing = [name for name, out in outputs.items() if out and out.group(1) not in names]
    unkept = [name for name, out in outputs.items() if not out]
    tail = ["## Benchmarks without results here", ""]
    if missing:
        tail.append("These scripts write a results file that is not in the repository; run them to measure: "
                    + ", ".join(f"`benchmarks/{s}`" for s in missing) + ".")
    if unkept:
        tail += ["", "These print their figures and keep no results file: "
                 + ", ".join(f"`benchmarks/{s}`" for s in unkept) + "."]
    if unknown:
        tail += ["", "Results files with no table here yet: " + ", ".join(f"`{n}`" for n in unknown) + "."]
    head = ["# Benchmarks", "",
            "<!-- generated by `python benchmarks/docs_tables.py` from benchmarks/results/: do not edit by hand -->",
            "", "Generated from the JSON files under `benchmarks/results/` by `python benchmarks/docs_tables.py`. "
            "Every figure depends on the machine and its load: each section names how it was measured. The scripted "
            "server is the test suite's `tests/loopback_server.py`."]
    return "\n\n".join(["\n".join(head), *sections, *(["\n".join(tail)] if len(tail) > 2 else [])]) + "\n"


def readme_with_table(text: str, results: Path = RESULTS) -> str:
    """README text with the personalization table between its markers replaced by the one the results give."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"README.md must hold {START} and then {END} once each")
    before, rest = text.split(START)
    _, after = rest.split(END)
    return f"{before}{START}\n{personalization_table(results)}\n{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    wanted = {DOCS_PAGE: benchmarks_page(), README: readme_with_table(README.read_text())}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} is out of date: run python benchmarks/docs_tables.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
