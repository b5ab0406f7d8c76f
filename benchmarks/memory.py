"""Memory benchmark: the Qdrant Edge memory against the previous implementation, side by side in one run.

    python benchmarks/memory.py                      # everything (about 10-15 minutes on 2 busy cores)
    python benchmarks/memory.py --quick              # sizes 100 and 1000, 20 users, fewer searches
    python benchmarks/memory.py --baseline none      # the current code only

The baseline ("old": qdrant-client local mode plus the in-process numpy mirror, removed with issue 16) is
checked out of git history at run time (``--baseline REF``, default the parent of the commit that removed
``local_index.py``) into a temporary folder; every measurement runs in a fresh Python process per
implementation, so open times, RSS, threads and file descriptors are each process's own.

Measured: ingest (items/s); search p50/p99 at each size, BM25 and hybrid; a search scoped to a 47-item
profile (LaMP_2N's median); open + first search in a new process; RSS; disk used and apparent; many
users (open, RSS, FDs, threads before and after touching every user); retrieval quality on the LaMP dev
sets in ../shared/lamp. Dense vectors of synthetic items come from a cache shared by both sides (one
embedding per corpus text, which is what makes 10k-item hybrid users affordable here), so hybrid ingest
and search time the store, not the model; BM25 is embedded by each side's own code. Prints a table and
writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPL = Path(os.environ.get("PERSONA_DSPY_BENCH_IMPL", REPO))
sys.path.insert(0, str(IMPL))
os.environ.setdefault("PERSONA_DSPY_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(os.environ.get("PERSONA_DSPY_SHARED", REPO.parent / "shared"))
DENSE_DIR = SHARED / "models" / "all-MiniLM-L6-v2-onnx"
PROFILE = 47
_NOTE = re.compile(r" \(note \d+\)$")


# -- helpers both sides run ---------------------------------------------------------------------------
def corpus_texts() -> list[str]:
    """Real review and news texts to build synthetic users of any size from."""
    from persona_dspy.data.lamp import dataset_dir, load_dataset

    texts: list[str] = []
    for task in ("LaMP_3", "LaMP_2N"):
        folder = SHARED / "lamp" / task if (SHARED / "lamp" / task).is_dir() else dataset_dir(task)
        for history in load_dataset(folder):
            texts.extend(it.text for it in history.items)
    return list(dict.fromkeys(texts))


def synthetic_items(texts: list[str], n: int, seed: int) -> list:
    from persona_dspy.data.records import HistoryItem
    from persona_dspy.data.tasks import get_task

    rng, spec, start = random.Random(seed), get_task("LaMP_3"), datetime(2015, 1, 1)
    return [HistoryItem.from_fields(spec, f"s{i}", start + timedelta(hours=i),
                                    {"text": f"{rng.choice(texts)} (note {i})", "score": str(rng.randint(1, 5))}, i)
            for i in range(n)]


def bench_queries(texts: list[str], n: int) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(texts).split()[:12]) for _ in range(n)]


class CachedDense:
    """Dense vectors by corpus text (the " (note i)" suffix of synthetic items dropped), read from a cache."""

    def __init__(self, cache: dict[str, list[float]]) -> None:
        self.cache = cache

    def embed(self, texts: list[str], batch_size: int = 32):
        return [self.cache[_NOTE.sub("", t)] for t in texts]

    def query_embed(self, text: str):
        return [self.cache[text] if text in self.cache else next(iter(self.cache.values()))]


def make_embedder(vectors: str, cache_file: str | None):
    from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig

    if vectors == "bm25":
        return Embedder()
    embedder = Embedder(EmbeddingConfig(sparse=True, dense=str(DENSE_DIR)))
    embedder._dense = CachedDense(json.loads(Path(cache_file).read_text()))
    return embedder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed_searches(memory, user: str, queries: list[str], mode: str, **scope) -> dict[str, float]:
    for q in queries[:5]:
        memory.search(user, q, 5, mode=mode, **scope)
    latencies = []
    for q in queries:
        t0 = time.perf_counter()
        memory.search(user, q, 5, mode=mode, **scope)
        latencies.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(percentile(latencies, 50), 3), "p99_ms": round(percentile(latencies, 99), 3)}


def process_figures() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "rss_anon_mb": round(int(status.get("RssAnon", "0 kB").split()[0]) / 1024, 1),
            "fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}


def disk(folder: Path) -> dict[str, float]:
    used = subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True).stdout.split()[0]
    apparent = subprocess.run(["du", "-sk", "--apparent-size", str(folder)], capture_output=True, text=True)
    return {"disk_mb": round(int(used) / 1024, 1), "apparent_mb": round(int(apparent.stdout.split()[0]) / 1024, 1)}


# -- worker jobs (one fresh process each) -------------------------------------------------------------
def job_scale(a: dict) -> dict:
    """Ingest ``size`` items for one user, time searches (all, scoped), leave the store for ``job_open``."""
    from persona_dspy.memory.episodic import EpisodicMemory

    texts = corpus_texts()
    queries = bench_queries(texts, a["queries"])
    embedder = make_embedder(a["vectors"], a.get("cache"))
    items = synthetic_items(texts, a["size"], a["size"])
    mode = "sparse" if a["vectors"] == "bm25" else "hybrid"
    with EpisodicMemory(a["folder"], embedder=embedder) as mem:
        t0 = time.perf_counter()
        mem.add("user", items)
        ingest = a["size"] / (time.perf_counter() - t0)
        row = {"ingest_items_per_s": round(ingest, 1), **timed_searches(mem, "user", queries, mode)}
        scope = {"within_ids": [it.id for it in items[-PROFILE:]], "exclude_ids": [items[-1].id]}
        scoped = timed_searches(mem, "user", queries, mode, **scope)
        row |= {"scoped_p50_ms": scoped["p50_ms"], "scoped_p99_ms": scoped["p99_ms"]}
    return row | disk(Path(a["folder"]))


def job_open(a: dict) -> dict:
    """A new process opens the store and searches once (the embedder is loaded before the clock starts)."""
    from persona_dspy.memory.episodic import EpisodicMemory

    embedder = make_embedder(a["vectors"], a.get("cache"))
    embedder.embed_query("warm up the query embedding")
    mode = "sparse" if a["vectors"] == "bm25" else "hybrid"
    t0 = time.perf_counter()
    mem = EpisodicMemory(a["folder"], embedder=embedder)
    hits = mem.search(a.get("user", "user"), "great sound for the price", 5, mode=mode)
    elapsed = time.perf_counter() - t0
    out = {"open_first_search_s": round(elapsed, 3), "hits": len(hits), **process_figures()}
    if a.get("all_users"):
        t0 = time.perf_counter()
        for u in range(a["all_users"]):
            mem.search(f"user{u}", "great sound for the price", 5, mode=mode)
        out |= {"touch_all_s": round(time.perf_counter() - t0, 2)} | {
            f"all_{k}": v for k, v in process_figures().items()}
    mem.close()
    return out


def job_many(a: dict) -> dict:
    """Fill ``users`` users of ``per_user`` items each (BM25)."""
    from persona_dspy.memory.episodic import EpisodicMemory

    texts = corpus_texts()
    embedder = make_embedder("bm25", None)
    t0 = time.perf_counter()
    with EpisodicMemory(a["folder"], embedder=embedder) as mem:
        for u in range(a["users"]):
            mem.add(f"user{u}", synthetic_items(texts, a["per_user"], u))
    return {"ingest_items_per_s": round(a["users"] * a["per_user"] / (time.perf_counter() - t0), 1)} | disk(
        Path(a["folder"]))


def job_quality(a: dict) -> dict:
    """Retrieval quality (5-nearest vote over each query's own profile) on the dev sets, real dense vectors."""
    from persona_dspy.data.lamp import dataset_dir, load_dataset
    from persona_dspy.evaluation.retrieval_quality import evaluate_retrieval
    from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig
    from persona_dspy.memory.episodic import EpisodicMemory

    embedder = Embedder(EmbeddingConfig(sparse=True, dense=str(DENSE_DIR))) if a["dense"] else Embedder()
    rows = []
    for task in ("LaMP_2N", "LaMP_3", "LaMP_2M"):
        folder = SHARED / "lamp" / task if (SHARED / "lamp" / task).is_dir() else dataset_dir(task)
        histories = load_dataset(folder)
        with tempfile.TemporaryDirectory() as tmp, EpisodicMemory(Path(tmp) / "m", embedder=embedder) as mem:
            mem.add_histories(histories)
            for strategy in ["recency", "majority", "bm25"] + (["dense", "hybrid"] if a["dense"] else []):
                rows.append(evaluate_retrieval(histories, strategy, k=5, memory=mem).as_row() | {"strategy": strategy})
            if a["dense"]:  # why the memory fuses with k=60: Qdrant's own default is k=2
                mem.rrf_k = 2
                rows.append(evaluate_retrieval(histories, "hybrid", k=5, memory=mem).as_row() | {
                    "strategy": "hybrid_rrf_k2"})
    return {"rows": rows}


JOBS = {"scale": job_scale, "open": job_open, "many": job_many, "quality": job_quality}


# -- the driver ---------------------------------------------------------------------------------------
def run_job(impl: Path, job: str, args: dict) -> dict:
    env = os.environ | {"PERSONA_DSPY_BENCH_IMPL": str(impl)}
    done = subprocess.run([sys.executable, __file__, "--job", job, "--job-args", json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{job} on {impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkout_baseline(ref: str, into: Path) -> Path:
    if ref == "auto":
        removed = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "--diff-filter=D", "--",
                                  "persona_dspy/memory/local_index.py"], capture_output=True, text=True).stdout.strip()
        if not removed:
            raise SystemExit("no commit removed persona_dspy/memory/local_index.py; pass --baseline REF")
        ref = f"{removed}^"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "persona_dspy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def dense_cache(path: Path, texts: list[str], queries: list[str]) -> None:
    from persona_dspy.memory.embeddings import Embedder, EmbeddingConfig

    model = Embedder(EmbeddingConfig(sparse=False, dense=str(DENSE_DIR)))._dense
    unique = list(dict.fromkeys(texts + queries + ["great sound for the price", "probe"]))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    vectors = list(model.embed([unique[i] for i in order], batch_size=32))
    path.write_text(json.dumps({unique[i]: [float(x) for x in v] for i, v in zip(order, vectors, strict=True)}))


HIGHER_IS_BETTER = {"ingest_items_per_s"}


def gain(key: str, old: float | None, new: float | None) -> str:
    """How many times better new is than old (above 1: new is better)."""
    if not old or not new:
        return "-"
    return f"{new / old:.2f}x" if key in HIGHER_IS_BETTER else f"{old / new:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=sorted(JOBS), help=argparse.SUPPRESS)
    parser.add_argument("--job-args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="sizes 100 and 1000, 20 users, 50 searches")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=200, help="searches timed per row")
    parser.add_argument("--users", type=int, default=100, help="users in the many-users rows (1k items each)")
    parser.add_argument("--baseline", default="auto", help="git ref of the old implementation, or 'none'")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--workdir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                        help="where the stores are built (default /dev/shm: the old layout's sqlite commits one "
                             "fsync per point, which on a busy disk timed its ingest, not its store)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    if args.job:
        print(json.dumps(JOBS[args.job](json.loads(args.job_args))))
        return
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10000])
    n_queries, users = (50, 20) if args.quick else (args.queries, args.users)
    has_dense = (DENSE_DIR / "model.onnx").is_file()
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="memory-bench-", dir=args.workdir) as tmp_name, \
            tempfile.TemporaryDirectory(prefix="memory-bench-disk-") as on_disk:
        tmp = Path(tmp_name)
        impls = {"new": REPO}
        if args.baseline != "none":
            impls = {"old": checkout_baseline(args.baseline, Path(tempfile.mkdtemp(dir=tmp))), "new": REPO}
        cache = tmp / "dense.json"
        if has_dense:
            texts = corpus_texts()
            dense_cache(cache, texts, bench_queries(texts, n_queries))
        rows: list[dict] = []
        vectors_list = ["bm25"] + (["hybrid"] if has_dense else [])
        for vectors in vectors_list:
            for size in sizes:
                row: dict = {"vectors": vectors, "items_per_user": size}
                for side, impl in impls.items():
                    folder = tmp / f"{side}-{vectors}-{size}"
                    job = {"folder": str(folder), "vectors": vectors, "size": size, "queries": n_queries,
                           "cache": str(cache)}
                    figures = run_job(impl, "scale", job) | run_job(impl, "open", job)
                    row[side] = figures
                    print(f"  {side} {vectors:6s} {size:>6d}: {figures}", flush=True)
                rows.append(row)
        disk_ingest = {side: run_job(impl, "scale", {"folder": f"{on_disk}/{side}", "vectors": "bm25",
                                                     "size": 1000, "queries": 20})["ingest_items_per_s"]
                       for side, impl in impls.items()}
        print(f"  ingest of 1k BM25 items on disk ({on_disk}), items/s: {disk_ingest}", flush=True)
        many: dict = {"users": users, "items_per_user": 1000}
        for side, impl in impls.items():
            folder = tmp / f"{side}-many"
            many[side] = run_job(impl, "many", {"folder": str(folder), "users": users, "per_user": 1000}) | run_job(
                impl, "open", {"folder": str(folder), "vectors": "bm25", "user": "user0", "all_users": users})
            print(f"  {side} {users} users x 1k: {many[side]}", flush=True)
        quality = {} if args.no_quality else {side: run_job(impl, "quality", {"dense": has_dense})["rows"]
                                              for side, impl in impls.items()}
    load_after = os.getloadavg()
    print_report(rows, many, quality, load_before, load_after)
    print(f"ingest of 1k BM25 items on disk instead of {args.workdir}, items/s: {disk_ingest}")
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after},
              "created": datetime.now().isoformat(timespec="seconds"), "seconds": round(time.time() - started, 1),
              "baseline": args.baseline, "workdir": args.workdir, "ingest_on_disk": disk_ingest,
              "scale": rows, "many_users": many, "quality": quality}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


def print_report(rows: list[dict], many: dict, quality: dict, load_before: tuple, load_after: tuple) -> None:
    sides = [s for s in ("old", "new") if s in (rows[0] if rows else many)]
    print(f"\nload average {load_before[0]:.1f} before, {load_after[0]:.1f} after (2 CPUs shared)")
    print("\n| vectors | items | figure | " + " | ".join(sides) + (" | new better by |" if len(sides) == 2 else " |"))
    print("|---|---|---|" + "---|" * (len(sides) + (len(sides) == 2)))
    figures = [("ingest_items_per_s", "ingest items/s"), ("p50_ms", "search p50 ms"), ("p99_ms", "search p99 ms"),
               ("scoped_p50_ms", f"scoped to {PROFILE} p50 ms"), ("open_first_search_s", "open + 1st search s"),
               ("rss_mb", "RSS after it MB"), ("rss_anon_mb", "anon RSS MB"), ("disk_mb", "disk used MB"),
               ("apparent_mb", "disk apparent MB")]
    for row in rows:
        for key, label in figures:
            values = [row[s].get(key) for s in sides]
            extra = f" | {gain(key, values[0], values[1])}" if len(sides) == 2 else ""
            print(f"| {row['vectors']} | {row['items_per_user']} | {label} | "
                  + " | ".join(str(v) for v in values) + extra + " |")
    for key in ("ingest_items_per_s", "open_first_search_s", "rss_mb", "rss_anon_mb", "fds", "threads", "touch_all_s",
                "all_rss_mb", "all_fds", "all_threads", "disk_mb", "apparent_mb"):
        values = [many[s].get(key) for s in sides]
        extra = f" | {gain(key, values[0], values[1])}" if len(sides) == 2 else ""
        print(f"| bm25 | {many['users']} users x 1k | {key} | " + " | ".join(str(v) for v in values) + extra + " |")
    if quality:
        print("\n| task | strategy | " + " | ".join(f"{s} accuracy | {s} MAE" for s in sides) + " |")
        print("|---|---|" + "---|---|" * len(sides))
        for i, row in enumerate(quality[sides[0]]):
            cells = []
            for side in sides:
                other = quality[side][i]
                cells += [f"{other['accuracy']:.3f}", f"{other['mae']:.3f}" if "mae" in other else "-"]
            print(f"| {row['task']} | {row['strategy']} | " + " | ".join(cells) + " |")
        same = all(quality[sides[0]][i] == quality[sides[-1]][i] for i in range(len(quality[sides[0]])))
        print(f"\nretrieval quality identical old vs new: {same}")
    print(f"(median of the new p50s: {statistics.median(r[sides[-1]]['p50_ms'] for r in rows) if rows else '-'})")


if __name__ == "__main__":
    main()
