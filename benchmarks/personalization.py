"""Does PersonaAgent personalize? Dev users of the shared LaMP sets, answered several ways, with the real local model.

Per user and task: the non-personalized agent (mode none), the initial persona (the default agent: the summary
from evidence, then answers with the query's own past items as demonstrations), PersonaAligner with its defaults
(starting from that same initial persona), and, as references without any LM, the user's majority label and the
5-nearest votes (BM25, and dense when the shared model is there) over each query's own profile. Per task and method:
the LaMP metrics pooled over users with 95 % bootstrap intervals over users, LM calls, prompt and completion
tokens and wall time per user. Results are appended per user to a JSONL file as they finish, so a long run can be
stopped and resumed (``--resume``); the table is built from that file.

    python benchmarks/personalization.py                         # every dev user, the embedded SmolLM2 model
    python benchmarks/personalization.py --max-users 5 --tasks LaMP_2N
    python benchmarks/personalization.py --lm openai/<model> --api-base http://gpu:8000/v1

The default model is SmolLM2-135M-Instruct on the CPU: it measures the method's plumbing on a real model, not what
PersonaAgent reaches with a 7B model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402
from personalization_table import markdown  # noqa: E402  (benchmarks/, beside this script)

from persona_dspy.agent.semantic_memory import initial_agent, initial_persona  # noqa: E402
from persona_dspy.data.examples import query_examples  # noqa: E402
from persona_dspy.data.lamp import load_dataset  # noqa: E402
from persona_dspy.evaluation.metrics import aggregate_by_user, primary_metric  # noqa: E402
from persona_dspy.evaluation.retrieval_quality import predict_query  # noqa: E402
from persona_dspy.evaluation.tables import format_table  # noqa: E402
from persona_dspy.files import write_atomically  # noqa: E402
from persona_dspy.jobs.alignment import align_user  # noqa: E402
from persona_dspy.lm.adapters import default_adapter  # noqa: E402
from persona_dspy.lm.build import build_lm  # noqa: E402
from persona_dspy.lm.report import describe_lm  # noqa: E402
from persona_dspy.lm.usage import LMUsage  # noqa: E402
from persona_dspy.memory.embeddings import EmbeddingConfig  # noqa: E402
from persona_dspy.memory.episodic import EpisodicMemory  # noqa: E402
from persona_dspy.outputs.validation import rejection  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ("LaMP_2N", "LaMP_3", "LaMP_2M")
METHODS = ("non_personalized", "initial_lm_only", "initial_persona", "persona_aligner", "majority", "memory_vote",
           "dense_vote")
DENSE = REPO.parent / "shared" / "models" / "all-MiniLM-L6-v2-onnx"
VOTES = {"majority": "majority", "memory_vote": "bm25", "dense_vote": "dense"}
BOOTSTRAP = 1000


def answer(agent: dspy.Module, examples: list[dspy.Example]) -> tuple[list[dict[str, Any]], int]:
    """Every test query answered; one that raises counts as an empty (invalid) answer, as LaMP scores it."""
    rows, errors = [], 0
    for example in examples:
        try:
            result = agent(**example.inputs())
            prediction, lm_answer = str(result.answer), str(getattr(result, "lm_answer", result.answer) or "")
        except Exception as exc:  # the run goes on; the error is counted and kept
            prediction, lm_answer, errors = "", "", errors + 1
            print(f"  answer failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        rows.append({"id": example.example_id, "prediction": prediction, "lm_prediction": lm_answer,
                     "gold": str(example.answer)})
    return rows, errors


def measured(lm: dspy.LM, step):  # noqa: ANN001
    """Run ``step()`` under ``lm`` with a fresh usage counter; returns (its result, usage snapshot, seconds)."""
    usage = LMUsage()
    started = time.perf_counter()
    with dspy.context(lm=lm, adapter=default_adapter()), usage.counting():
        result = step()
    return result, usage.snapshot(), round(time.perf_counter() - started, 3)


def run_user(history, memory: EpisodicMemory, lm: dspy.LM, search_mode: str, iterations: int) -> dict[str, Any]:  # noqa: ANN001, E501
    tests = query_examples(history)
    record: dict[str, Any] = {"task": history.task, "user_id": history.user_id, "methods": {}}

    def keep(name: str, predictions, usage, seconds, **extra: Any) -> None:  # noqa: ANN001
        rows, errors = predictions
        record["methods"][name] = {"predictions": rows, "errors": errors, "calls": usage["calls"],
                                   "prompt_tokens": usage["prompt_tokens"],
                                   "completion_tokens": usage["completion_tokens"], "seconds": seconds, **extra}

    none_agent = initial_agent(history, memory, mode="none")
    keep("non_personalized", *measured(lm, lambda: answer(none_agent, tests)))

    try:  # a step that fails (e.g. a prompt over the server's context) fails that method for this user only
        persona, built, build_seconds = measured(lm, lambda: initial_persona(history))
        start = initial_agent(history, memory, persona=persona, search_mode=search_mode)
        rows, used, seconds = measured(lm, lambda: answer(start, tests))
        keep("initial_persona", rows, _plus(built, used), round(build_seconds + seconds, 3))
        lm_only = [{**r, "prediction": r["lm_prediction"]} for r in rows[0]]  # the same answers, not overruled
        keep("initial_lm_only", (lm_only, rows[1]), _plus(built, used), round(build_seconds + seconds, 3))
        aligned, aligning, align_seconds = measured(lm, lambda: align_user(history, memory, start=start,
                                                                             iterations=iterations))
        rows, used, seconds = measured(lm, lambda: answer(aligned, tests))
        keep("persona_aligner", rows, _plus(built, aligning, used), round(build_seconds + align_seconds + seconds, 3),
             alignment={k: aligned.alignment[k] for k in ("start_score", "best_score", "improved", "steps_run",
                                                           "fallbacks", "invalid") if k in aligned.alignment})
        record["personas"] = {"initial": start.persona, "aligned": aligned.persona,  # to explain answer changes
                              "initial_summary": start.persona_summary, "aligned_summary": aligned.persona_summary,
                              "problems": [p for p in (persona_problems(s, history) for s in
                                                       (start.persona_summary, aligned.persona_summary)) if p]}
    except Exception as exc:  # recorded: the table counts such users as failed, never as scored
        record["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"  {history.user_id}: {record['failed']}", file=sys.stderr)

    for method, strategy in VOTES.items():
        if strategy == "dense" and memory.embedder.config.dense is None:
            continue
        votes = [{"id": q.id, "prediction": predict_query(history, q, strategy, 5, memory)[0] or "", "gold": q.gold}
                 for q in history.queries]
        record["methods"][method] = {"predictions": votes, "errors": 0, "calls": 0, "prompt_tokens": 0,
                                     "completion_tokens": 0, "seconds": 0.0}
    return record


def persona_problems(summary: str, history) -> str | None:  # noqa: ANN001
    """Why a saved persona summary would be junk (repetition, copied history, a placeholder...), else None."""
    return rejection(summary, copied_from=[item.text for item in history.items])


def _plus(*usages: dict[str, Any]) -> dict[str, int]:
    return {key: sum(int(u.get(key, 0)) for u in usages) for key in ("calls", "prompt_tokens", "completion_tokens")}


def summarize(task: str, records: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """One row per method: pooled metrics, a bootstrap interval over users for the primary one, costs per user."""
    key, _ = primary_metric(task)
    rows = []
    for method in METHODS:
        # every method on the same users: those whose run completed (a failed user is counted, not scored)
        per_user = [(r["user_id"], r["methods"][method]) for r in records if "failed" not in r
                     and method in r["methods"]]
        failed = sum("failed" in r for r in records)
        if not per_user:
            continue
        pooled = [(u, p["prediction"], p["gold"]) for u, m in per_user for p in m["predictions"]]
        overall = aggregate_by_user(task, pooled)["overall"]
        samples = []
        for _ in range(BOOTSTRAP):
            drawn = [per_user[rng.randrange(len(per_user))] for _ in per_user]
            rows_b = [(i, p["prediction"], p["gold"]) for i, (_, m) in enumerate(drawn) for p in m["predictions"]]
            samples.append(aggregate_by_user(task, rows_b)["overall"][key])
        samples.sort()
        n = len(per_user)
        rows.append({"task": task, "method": method, "users": n, "failed_users": failed, "metric": key,
                     "value": overall[key],
                     "ci_low": samples[int(0.025 * BOOTSTRAP)], "ci_high": samples[int(0.975 * BOOTSTRAP) - 1],
                     "metrics": overall, "errors": sum(m["errors"] for _, m in per_user),
                     "calls_per_user": sum(m["calls"] for _, m in per_user) / n,
                     "prompt_tokens_per_user": sum(m["prompt_tokens"] for _, m in per_user) / n,
                     "completion_tokens_per_user": sum(m["completion_tokens"] for _, m in per_user) / n,
                     "seconds_per_user": sum(m["seconds"] for _, m in per_user) / n})
    return rows


def cache_noise(records: list[dict[str, Any]]) -> dict[str, int]:
    """Users whose aligner kept the starting persona, and those of them whose answers still changed.

    With the persona kept, the aligner row sends the initial-persona row's very prompts again; at temperature 0 a
    changed answer is then the server's doing (llama.cpp's reused prompt cache), not the method's. Only records
    that keep both personas count.
    """
    kept = [r for r in records if "failed" not in r and "personas" in r
            and r["personas"]["initial"] == r["personas"]["aligned"]]
    changed = sum([p["prediction"] for p in r["methods"]["initial_persona"]["predictions"]]
                  != [p["prediction"] for p in r["methods"]["persona_aligner"]["predictions"]] for r in kept)
    return {"persona_kept_users": len(kept), "answers_changed_anyway": changed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "lamp")
    parser.add_argument("--max-users", type=int, default=None, help="per task (default: every dev user)")
    parser.add_argument("--first-user", type=int, default=0,
                        help="start at this user of each task (a second process can run the next users; append "
                             "its JSONL to the first's and rebuild the table with --report-only)")
    parser.add_argument("--lm", default="local")
    parser.add_argument("--api-base", default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--no-prompt-cache", action="store_true",
                        help="the embedded server recomputes every prompt: slower, but identical prompts get "
                             "identical answers (with the cache, a kept persona can still change answers)")
    parser.add_argument("--retrieval", choices=("auto", "sparse", "dense", "hybrid"), default="sparse",
                        help="the agent's search (default sparse: BM25, what memory holds without --dense)")
    parser.add_argument("--iterations", type=int, default=1, help="aligner update steps (default 1, compile's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "personalization.json")
    parser.add_argument("--resume", action="store_true", help="keep the users already in <out>.jsonl")
    parser.add_argument("--report-only", action="store_true",
                        help="build the table from <out>.jsonl without running any user (e.g. after a stopped run)")
    args = parser.parse_args(argv)

    log = args.out.with_suffix(".jsonl")
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if (args.resume or args.report_only) and log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            done[(record["task"], record["user_id"])] = record
    elif log.exists():
        log.unlink()
    log.parent.mkdir(parents=True, exist_ok=True)
    server = {"slots": 1, **({"prompt_cache": False} if args.no_prompt_cache else {})}
    lm = None if args.report_only else build_lm(args.lm, args.api_base, max_tokens=args.max_tokens, server=server)
    started = time.perf_counter()
    users, memories = {}, {}
    for task in args.tasks:
        end = None if args.max_users is None else args.first_user + args.max_users
        users[task] = load_dataset(args.data_root / task)[args.first_user:end]
        dense = str(DENSE) if (DENSE / "model.onnx").is_file() else None  # for the dense vote (and --retrieval)
        memories[task] = EpisodicMemory(":memory:", embedding=EmbeddingConfig(sparse=True, dense=dense))
        memories[task].add_histories(users[task])
    # round-robin over tasks, so that a run stopped early has measured every task on some users
    order = [(task, i) for i in range(max(map(len, users.values()))) for task in args.tasks if i < len(users[task])]
    for task, i in order:
        history = users[task][i]
        if lm is None or (history.task, history.user_id) in done:
            continue
        print(f"{task} user {i + 1}/{len(users[task])} {history.user_id}", file=sys.stderr, flush=True)
        record = run_user(history, memories[task], lm, args.retrieval, args.iterations)
        done[(history.task, history.user_id)] = record
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    rng = random.Random(0)
    rows = [row for task in args.tasks for row in
            summarize(task, [r for (t, _), r in done.items() if t == task], rng)]
    print(format_table(
        [{**r, "value (95% CI)": f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"} for r in rows],
        ["task", "method", "users", "failed_users", "metric", "value (95% CI)", "errors", "calls_per_user",
         "prompt_tokens_per_user", "completion_tokens_per_user", "seconds_per_user"], digits=1))
    totals = {task: len(histories) for task, histories in users.items()}
    result = {"lm": describe_lm(lm) if lm is not None else args.lm, "bootstrap": BOOTSTRAP, "rows": rows,
              "users_run": {task: sum(t == task for t, _ in done) for task in args.tasks}, "users_total": totals,
              "cache_noise": {task: cache_noise([r for (t, _), r in done.items() if t == task]) for task in args.tasks},
              # a --report-only rebuild ran no user: its time would be the memory's, not the benchmark's
              "wall_seconds": None if args.report_only else round(time.perf_counter() - started, 1),
              "retrieval": args.retrieval,
              "iterations": args.iterations,
              "persona_problems": sum(bool(r.get("personas", {}).get("problems")) for r in done.values()),
              "note": "SmolLM2-135M-Instruct on the CPU unless --lm says otherwise: the method's plumbing on a real "
                      "model, not what PersonaAgent reaches with a 7B model"}
    print(markdown(rows))
    for task, noise in result["cache_noise"].items():
        print(f"{task}: the aligner kept the starting persona for {noise['persona_kept_users']} users; "
              f"{noise['answers_changed_anyway']} of them answered differently anyway (the server's prompt cache)")
    write_atomically(args.out, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {args.out} (per user: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
